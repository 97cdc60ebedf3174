"""Perplexity by context length and by token position on held-out documents of the shipped corpus.

Windows: up to ``samples`` windows of exactly ``L`` tokens (``[bos?] + document tokens``), cut from held-out
documents (:func:`anchorcontext.assets.heldout_split` of the stdlib corpus,
5 %, seed 0) that hold at least ``L`` tokens: consecutive non-overlapping windows of one document, documents
taken round-robin in a seeded order. No window ever crosses a document boundary, so the loss at position
``p`` measures how well ``p`` tokens of the *same* document are used. By default (``nested=True``) the
windows of every length are prefixes of the same ``max(lengths)``-token windows, so perplexity vs length
compares the same text with more or less context.

Outputs per length: mean next-token NLL (nats) and perplexity over all predicted tokens of all windows,
and the mean NLL in log2-spaced position bins ``[1, 2), [2, 4), ..., [2^k, L)`` (position = index of the
predicted token in the window).

The model runs its own attention (nothing is patched), in ``eval()`` mode and ``torch.no_grad()``. The
vocabulary projection is applied in chunks of 1024 positions when the model allows it (no logit softcap
or scaling), so an 8K window of a 49K vocabulary never materialises 1.6 GB of float32 logits.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["heldout_windows", "perplexity_by_length", "token_nll"]


def _prefix_ids(tokenizer: Any, bos: str) -> list[int]:
    if bos not in ("auto", "always", "never"):
        raise ValueError(f"bos must be 'auto', 'always' or 'never', got {bos!r}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos == "always":
        if bos_id is None:
            raise ValueError("bos='always' but the tokenizer has no bos_token_id")
        return [bos_id]
    if bos == "auto" and bos_id is not None:
        probe = tokenizer("a")["input_ids"]
        return [bos_id] if probe and probe[0] == bos_id else []
    return []


def heldout_windows(
    tokenizer: Any,
    length: int,
    samples: int,
    *,
    docs: list[dict] | None = None,
    seed: int = 0,
    bos: str = "auto",
) -> tuple[list[list[int]], list[str]]:
    """Up to ``samples`` windows of exactly ``length`` token ids, and the document name of each.

    ``docs`` defaults to the held-out 5 % of :func:`anchorcontext.assets.stdlib_documents`. Documents shorter
    than a window are skipped; fewer (possibly zero) windows come back when too few documents are long enough.
    """
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if docs is None:
        from anchorcontext.assets import heldout_split, stdlib_documents

        docs = heldout_split(stdlib_documents())[1]
    prefix = _prefix_ids(tokenizer, bos)
    body = length - len(prefix)
    order = list(range(len(docs)))
    random.Random(f"ppl:{seed}").shuffle(order)
    chunks: list[list[list[int]]] = []
    names: list[str] = []
    for i in order:
        ids = tokenizer(docs[i]["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= body:
            chunks.append([ids[s : s + body] for s in range(0, len(ids) - body + 1, body)])
            names.append(docs[i]["name"])
    windows, owners = [], []
    depth = 0
    while len(windows) < samples and any(depth < len(c) for c in chunks):
        for c, name in zip(chunks, names):
            if depth < len(c) and len(windows) < samples:
                windows.append(prefix + c[depth])
                owners.append(name)
        depth += 1
    return windows, owners


def _chunked_head_ok(model: Any) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "get_decoder") or model.get_output_embeddings() is None:
        return False
    # Models that transform logits after the head (Gemma2 softcap, Granite/Cohere scaling) take the full path.
    return not any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logits_scaling", "logit_scale"))


@torch.no_grad()
def token_nll(model: Any, input_ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Next-token NLL (nats), ``(B, L-1)`` float32, for ``input_ids`` ``(B, L)`` int64 (no padding).

    Entry ``[b, p-1]`` is ``-log P(x[b, p] | x[b, :p])``. An all-ones attention mask is passed so stock
    attention never infers packed sequences from position ids.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (B, L) with L >= 2, got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    mask = torch.ones_like(ids)
    targets = ids[:, 1:]
    if _chunked_head_ok(model):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        out = []
        for s in range(0, ids.shape[1] - 1, chunk):
            e = min(s + chunk, ids.shape[1] - 1)
            logits = head(hidden[:, s:e]).float()
            out.append(F.cross_entropy(logits.transpose(1, 2), targets[:, s:e], reduction="none"))
        return torch.cat(out, dim=1).cpu()
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").cpu()


def _position_bins(length: int) -> list[tuple[int, int]]:
    bins, lo = [], 1
    while lo < length:
        hi = min(2 * lo, length)
        bins.append((lo, hi))
        lo = hi
    return bins


def perplexity_by_length(
    model: Any,
    tokenizer: Any,
    lengths: list[int],
    *,
    samples: int = 4,
    docs: list[dict] | None = None,
    seed: int = 0,
    bos: str = "auto",
    batch_size: int = 1,
    nested: bool = True,
    progress: bool = True,
) -> dict:
    """``{"by_length": {str(L): {...}}, "docs": "...", "nested": bool}``; definitions in the module docstring.

    ``nested=True`` (default): every length uses the *same* windows, the ``L``-token prefixes of the
    ``max(lengths)``-token windows, so lengths differ only in how much context the model has (one forward pass
    per window; a causal model's NLL of a prefix is the prefix of its NLL). Falls back to per-length windows
    (``nested: False`` in the result) when no held-out document is long enough for ``max(lengths)``.
    ``nested=False``: independent windows per length (more documents qualify for short lengths, but
    lengths then also differ in which documents they see).

    Each ``by_length[str(L)]`` holds ``windows``, ``tokens`` (predicted tokens), ``nll``, ``ppl``,
    ``documents`` (names) and ``by_position``: ``[{"start", "end", "nll", "ppl"}, ...]``. A length for which
    no held-out document is long enough has ``windows = 0`` and ``nll = ppl = None``.
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    lengths = sorted({int(L) for L in lengths})
    if not lengths or lengths[0] < 2:
        raise ValueError(f"lengths must be ints >= 2, got {lengths!r}")
    was_training = model.training
    model.eval()
    source = "heldout 5% of stdlib corpus" if docs is None else "given"
    result: dict[str, Any] = {"by_length": {}, "docs": source, "nested": False}

    def _nll(windows: list[list[int]], bar) -> np.ndarray:
        rows = []
        for s in range(0, len(windows), batch_size):
            rows.append(token_nll(model, torch.tensor(windows[s : s + batch_size], dtype=torch.long)))
            bar.update(len(windows[s : s + batch_size]))
        return torch.cat(rows).double().numpy()  # (windows, L-1); column p-1 predicts token p

    def _entry(nll: np.ndarray, owners: list[str], L: int) -> dict:
        mean = float(nll.mean())
        by_pos = []
        for lo, hi in _position_bins(L):
            v = float(nll[:, lo - 1 : hi - 1].mean())
            by_pos.append({"start": lo, "end": hi, "nll": v, "ppl": math.exp(v)})
        return {"windows": int(nll.shape[0]), "tokens": int(nll.size), "nll": mean, "ppl": math.exp(mean),
                "documents": sorted(set(owners)), "by_position": by_pos}  # fmt: skip

    empty = {"windows": 0, "tokens": 0, "nll": None, "ppl": None, "documents": [], "by_position": []}
    try:
        longest = heldout_windows(tokenizer, lengths[-1], samples, docs=docs, seed=seed, bos=bos)
        if nested and longest[0]:
            bar = tqdm(total=len(longest[0]), desc="perplexity", unit="window", disable=not progress)
            full = _nll(longest[0], bar)
            bar.close()
            result["nested"] = True
            for L in lengths:
                result["by_length"][str(L)] = _entry(full[:, : L - 1], longest[1], L)
            return result
        plan = [(L, *heldout_windows(tokenizer, L, samples, docs=docs, seed=seed, bos=bos)) for L in lengths]
        bar = tqdm(total=sum(len(w) for _, w, _ in plan), desc="perplexity", unit="window", disable=not progress)
        for L, windows, owners in plan:
            result["by_length"][str(L)] = _entry(_nll(windows, bar), owners, L) if windows else dict(empty)
        bar.close()
    finally:
        model.train(was_training)
    return result
