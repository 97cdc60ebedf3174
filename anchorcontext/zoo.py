"""The model zoo: every causal LM of the installed transformers, built tiny, patched, checked against the oracle.

For each entry of transformers' causal-LM auto mapping (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``):

1. build a tiny random model from the family's default config with one generic shrinker (:func:`tiny_config`:
   hidden size, layers, heads, KV heads, head dim, vocab, experts, windows, layer types); a family that cannot be
   built tiny is reported as ``"not built"`` with the error;
2. call :func:`anchorcontext.patch_model`. A ``ValueError`` is the family's ``"refused"`` status, with its message;
3. otherwise check: plain forwards (no ``anchor_*`` keys) are bitwise the stock model's, and for ``anchor`` and
   ``intra_doc`` with ``continuous`` and ``reset`` positions every document of a packed batch (2 rows, awkward
   lengths, a one-token document, right padding) equals its standalone run (``[anchor] + document``, the same
   position ids) within ``TOL`` in float32: ``"exact"``. Anything else is ``"WRONG"``: accepted and not exact,
   which must never happen (the test asserts it).

``python -m anchorcontext.zoo --write docs/models.md`` writes the support table (exit status 1 when a family is
WRONG); tests/test_zoo.py runs the whole zoo (~35 s on 2 cores) and checks that the table of the installed
transformers version (``docs/models.md``, or ``docs/models-transformers-<version>.md``) is current.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import sys
import time
import warnings

import torch

TOL = 1e-5
# the chunked loss vs stock: loss and every gradient, relative to the tensor's largest stock value (float32)
LOSS_TOL = 1e-5
LOSS_UNCHECKED = "not checked"  # the stock model's own loss fails on the batch (an upstream bug)
VOCAB = 128
ANCHOR, PAD, EOS = 1, 0, 2
# documents per row (row 0 padded by one token): a one-token document, odd lengths, more documents than heads
LENS = ((5, 3, 7), (1, 10, 2, 2))
L = 17
MODES = (("anchor", "continuous"), ("anchor", "reset"), ("intra_doc", "continuous"), ("intra_doc", "reset"))

STATUS_EXACT, STATUS_REFUSED, STATUS_NOT_BUILT, STATUS_WRONG = "exact", "refused", "not built", "WRONG"


@dataclasses.dataclass
class ZooResult:
    """One family's outcome. ``worst``: the largest |packed - standalone| over documents and modes (exact only)."""

    model_type: str
    class_name: str
    status: str
    worst: float | None = None
    reason: str = ""
    seconds: float = 0.0
    loss: str = ""  # the chunked loss (exact families only): "exact <diff>", "refused: <why>", "WRONG: <why>"


# ---- the shrinker -------------------------------------------------------------------------------------------------

_SIZES = {
    # width
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "embed_dim": 64, "dim": 64, "word_embed_proj_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128, "inner_hidden_size": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "moe_ffn_hidden_size": 32, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128, "dense_intermediate_size": 128,
    # depth
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    # heads
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2, "n_head_kv": 2, "num_kv_heads": 2,
    "head_dim": 16, "kv_channels": 16, "rotary_dim": 8,
    # MLA (DeepSeek V2/V3, MiniCPM3, ...)
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16,
    # experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "top_k": 2, "n_shared_experts": 1, "n_group": 1,
    "topk_group": 1, "num_shared_experts": 1, "first_k_dense_replace": 1,
    # positions and vocabulary
    "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "max_sequence_length": 128,
    "vocab_size": VOCAB,
}
_WINDOWS = ("sliding_window", "attention_window_size", "window_size", "sliding_window_size")
_TOKENS = {"pad_token_id": PAD, "bos_token_id": ANCHOR, "eos_token_id": EOS, "decoder_start_token_id": ANCHOR}


def _get(cfg, k):
    try:
        return getattr(cfg, k, None)
    except Exception:  # a per-layer attribute (Gemma 4) refuses a global read
        return None


def _set(cfg, k, v) -> bool:
    """Set ``cfg.k = v`` unless ``k`` is a read-only property (derived from other fields)."""
    try:
        setattr(cfg, k, v)
    except Exception:  # a read-only property, or a per-layer attribute
        return False
    return True


def _shrink(cfg, depth: int = 0) -> None:
    """Shrink ``cfg`` in place (and its sub-configs: ``text_config`` etc.)."""
    from transformers import PretrainedConfig

    d = cfg.to_dict()
    names = set(d) | set(getattr(cfg, "attribute_map", {}) or {})
    for k, v in _SIZES.items():
        if k in names and (isinstance(d.get(k, _get(cfg, k)), int) or d.get(k) is None and k in d):
            if _get(cfg, k) is None and k in ("q_lora_rank", "rotary_dim"):
                continue  # None means "off" / "all of head_dim": keep it
            _set(cfg, k, v)
    if "kv_lora_rank" in names:  # MLA expands its latent to one key-value head per query head
        _set(cfg, "num_key_value_heads", _get(cfg, "num_attention_heads") or 4)
        _set(cfg, "head_dim", _SIZES["qk_rope_head_dim"])  # MLA's rotary part
    if "is_decoder" in names:  # encoder families are causal LMs only as decoders (as their docs ask)
        _set(cfg, "is_decoder", True)
    for k in _WINDOWS:
        if isinstance(_get(cfg, k), int) and _get(cfg, k) > 0:
            _set(cfg, k, 4)  # shorter than the documents, so the window really bites
    for k, v in _TOKENS.items():
        if k in names:
            _set(cfg, k, v)
    layers = next((_get(cfg, k) for k in ("num_hidden_layers", "num_layers", "n_layer") if
                   isinstance(_get(cfg, k), int)), None)
    for k in ("layer_types", "layers_block_type", "block_types", "layer_type", "hybrid_override_pattern"):
        v = _get(cfg, k)
        if isinstance(v, (list, tuple)) and v and layers:
            kinds = list(dict.fromkeys(v))  # every kind once, in order of appearance
            n = max(layers, len(kinds))
            if _set(cfg, k, [kinds[i % len(kinds)] for i in range(n)]):
                for lk in ("num_hidden_layers", "num_layers", "n_layer"):
                    if isinstance(_get(cfg, lk), int):
                        _set(cfg, lk, n)
    if depth < 2:
        for k, v in list(vars(cfg).items()):
            if isinstance(v, PretrainedConfig):
                _shrink(v, depth + 1)


def tiny_config(model_type: str, config_class=None):
    """The family's default config (``config_class``'s when the model class takes another config than the model
    type's, e.g. a text-only class of a multimodal type), shrunk: 2+ layers, 4 heads of 16, hidden 64, vocab 128."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    if config_class is not None and not isinstance(cfg, config_class):
        cfg = config_class()
    if "per_layer_config" in vars(cfg):  # per-layer overrides (Gemma 4) of the fields we shrink: rebuild without
        d = {k: v for k, v in cfg.to_dict().items() if k not in ("per_layer_config", "transformers_version")}
        d.update({k: v for k, v in _SIZES.items() if k in d and (isinstance(d[k], int) or d[k] is None)})
        cfg = type(cfg)(**d, global_head_dim=_SIZES["head_dim"])
    _shrink(cfg)
    cfg.use_cache = False
    return cfg


def build(model_type: str, class_name: str, attn: str = "sdpa"):
    """A tiny model of ``class_name`` on ``attn`` (falls back to ``eager`` when the family has no SDPA)."""
    import transformers

    cls = getattr(transformers, class_name)
    cfg = tiny_config(model_type, getattr(cls, "config_class", None))
    torch.manual_seed(0)
    try:
        model = cls._from_config(cfg, attn_implementation=attn)
    except (ValueError, ImportError) as e:
        if attn == "eager" or "sdpa" not in str(e).lower() and "attention" not in str(e).lower():
            raise
        torch.manual_seed(0)
        model = cls._from_config(cfg, attn_implementation="eager")
    return model.float().eval()


# ---- the oracle ---------------------------------------------------------------------------------------------------

def packed_batch(mask: str, positions: str, seed: int = 0):
    from .collator import AnchorCollator

    g = torch.Generator().manual_seed(seed)
    rows = []
    for lens in LENS:
        ids = [ANCHOR] + torch.randint(3, VOCAB, (sum(lens),), generator=g).tolist()
        ids += [PAD] * (L - len(ids))
        rows.append({"input_ids": ids, "doc_lens": list(lens)})
    return AnchorCollator(anchor_id=ANCHOR, pad_id=PAD, mask=mask, positions=positions)(rows)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def _plain(model, ids):
    return _logits(model(input_ids=ids, attention_mask=torch.ones_like(ids)))


def check_model(model) -> float:
    """Return the worst |packed - standalone| over every document and mode of the patched ``model``; raises
    ``AssertionError`` when plain forwards differ from ``stock`` (the logits before the patch)."""
    worst = 0.0
    for mask, positions in MODES:
        batch = packed_batch(mask, positions)
        packed = _logits(model(**batch))
        d = batch["anchor_layout"].doc_ids
        for r in range(d.shape[0]):
            for doc in range(1, int(d[r].max()) + 1):
                idx = (d[r] == doc).nonzero().squeeze(1)
                alone = torch.cat([torch.tensor([0]), idx]) if mask == "anchor" else idx
                a_ids = batch["input_ids"][r, alone][None]
                pos = batch["position_ids"][r, alone][None]
                # an all-ones mask stops stock attention from reading packing off the position ids
                ref = _logits(model(input_ids=a_ids, position_ids=pos, attention_mask=torch.ones_like(a_ids)))[0]
                ref = ref[1:] if mask == "anchor" else ref
                worst = max(worst, (packed[r, idx] - ref).abs().max().item())
    return worst


class StockLossFailed(RuntimeError):
    """The stock model's own loss and backward failed on the anchor batch: nothing to compare the chunked loss with."""


def check_chunked_loss(model) -> float:
    """The worst relative difference between ``patch_model(chunked_loss=True)`` and the stock loss on an anchor
    batch with labels: the loss and every parameter gradient, each relative to its largest stock value (MoE families
    with ``output_router_logits`` on, so their router aux loss is included). ``model`` is patched; raises the
    ``ValueError`` of a refusal."""
    import anchorcontext as ac

    batch = packed_batch("anchor", "continuous")
    batch["labels"] = batch["anchor_layout"].labels(batch["input_ids"])
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(cfg, "output_router_logits"):
            cfg.output_router_logits = True
    runs = []
    with torch.enable_grad():
        for chunked in (False, True):
            ac.patch_model(model, chunked_loss=chunked, loss_chunk_tokens=7)
            model.zero_grad(set_to_none=True)
            try:
                loss = model(**batch).loss
                loss.backward()
            except Exception as e:
                if chunked:
                    raise
                raise StockLossFailed(_short(e, 200)) from e
            runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    ac.patch_model(model)
    (ref, g_ref), (got, g_got) = runs
    if g_ref.keys() != g_got.keys():
        raise AssertionError(f"the chunked loss reached other parameters: {sorted(g_ref.keys() ^ g_got.keys())[:4]}")

    # each gradient relative to its own largest value, floored at 1% of the largest gradient in the model: a
    # gradient that is zero in exact arithmetic (a key bias under softmax) is rounding noise of the other terms
    floor = 1e-2 * max((float(g.abs().max()) for g in g_ref.values()), default=0.0)

    def rel(a, b, lo=0.0):
        return float((a - b).abs().max() / b.abs().max().clamp(min=max(lo, 1e-30)))

    return max([rel(got, ref)] + [rel(g_got[n], g, floor) for n, g in g_ref.items()])


def causal_lm_classes() -> list[tuple[str, str]]:
    """``(model_type, class name)`` of every causal LM in the installed transformers' auto mapping, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


def _short(e: BaseException, n: int = 200) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}" + ("..." if len(msg) > n else "")


def run_family(model_type: str, class_name: str) -> ZooResult:
    """Build, patch and check one family (see the module docstring for the statuses)."""
    import anchorcontext as ac

    t0 = time.perf_counter()
    res = ZooResult(model_type, class_name, STATUS_NOT_BUILT)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            model = build(model_type, class_name)
        except Exception as e:
            res.reason = _short(e)
            res.seconds = time.perf_counter() - t0
            return res
        try:
            ac.patch_model(model)
        except ValueError as e:
            res.status, res.reason = STATUS_REFUSED, _short(e, 400)
        else:
            ac.unpatch_model(model)
            ids = packed_batch("anchor", "continuous")["input_ids"]
            try:
                stock = _plain(model, ids)
            except Exception as e:  # the tiny stock model itself does not run: a shrinker limit, not ours
                res.reason = "stock forward failed: " + _short(e)
            else:
                ac.patch_model(model)
                try:
                    plain = _plain(model, ids)
                    if not torch.equal(plain, stock):
                        raise AssertionError(f"a plain forward changed after patch_model: max diff "
                                             f"{(plain - stock).abs().max().item():.3g}")
                    res.worst = check_model(model)
                except ValueError as e:
                    res.status, res.reason = STATUS_REFUSED, "at the first anchor forward: " + _short(e, 400)
                except Exception as e:
                    res.status, res.reason = STATUS_WRONG, _short(e, 400)
                else:
                    res.status = STATUS_EXACT if res.worst <= TOL else STATUS_WRONG
                    if res.status == STATUS_WRONG:
                        res.reason = f"accepted but max |packed - standalone| = {res.worst:.3g}"
                    else:
                        res.loss = _loss_status(model)
    res.seconds = time.perf_counter() - t0
    return res


def _loss_status(model) -> str:
    try:
        worst = check_chunked_loss(model)
    except ValueError as e:
        return f"{STATUS_REFUSED}: {_short(e, 300)}"
    except StockLossFailed as e:
        return f"{LOSS_UNCHECKED}: the stock loss itself fails ({e})"
    except Exception as e:
        return f"{STATUS_WRONG}: {_short(e, 300)}"
    return f"{STATUS_EXACT} {worst:.0e}" if worst <= LOSS_TOL else f"{STATUS_WRONG}: relative diff {worst:.3g}"


def run_all(families=None, progress=None) -> list[ZooResult]:
    """:func:`run_family` for every causal LM (or the model types in ``families``), in mapping order."""
    logging.disable(logging.WARNING)
    try:
        out = []
        for t, c in causal_lm_classes():
            if families and t not in families:
                continue
            out.append(run_family(t, c))
            if progress is not None:
                progress(out[-1])
        return out
    finally:
        logging.disable(logging.NOTSET)


_HEADER = "| model type | class | status | worst diff | chunked loss | reason |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(results: list[ZooResult]) -> str:
    """docs/models.md: the support table of one zoo run (the transformers version named in it)."""
    import transformers

    counts = {st: sum(r.status == st for r in results) for st in (STATUS_EXACT, STATUS_REFUSED, STATUS_NOT_BUILT,
                                                                    STATUS_WRONG)}
    lines = [
        "# Model support",
        "",
        ("Generated by `python -m anchorcontext.zoo --write docs/models.md` (do not edit by hand; "
        "`tests/test_zoo.py` checks that it is current)."),
        "",
        (f"transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}: every causal LM of the "
        f"auto mapping ({len(results)} model types) built tiny from its default config "
        "(`anchorcontext.zoo.tiny_config`: hidden 64, 2+ layers, 4 heads of 16, 2 KV heads, vocab 128, 4 experts, "
        "windows of 4 tokens, every layer kind kept), float32, then patched with `anchorcontext.patch_model`."),
        "",
        ("- **exact**: plain forwards are bitwise the stock model's, and for `anchor` and `intra_doc` masks with "
        "`continuous` and `reset` positions every document of a packed batch (2 rows; documents of 1-10 tokens; "
        "right padding) equals its standalone run (`[anchor] + document`, same position ids); *worst diff* is the "
        f"largest |packed - standalone| logit over all of them (the bar: {TOL:g})."),
        ("- **refused**: `patch_model` (or, for what only a call shows, the first anchor forward) raises a "
        "`ValueError` naming what is missing. Never accepted and wrong: a family that is accepted and not exact "
        "fails the test."),
        ("- *chunked loss* (exact families): `patch_model(chunked_loss=True)` on an anchor batch with labels (chunks "
        "of 7 tokens; MoE router aux loss on): **exact** when the loss and every parameter gradient equal the stock "
        f"HF loss's within {LOSS_TOL:g} of each tensor's largest value (floored at 1% of the model's largest "
        "gradient; the figure is the worst), **refused** with the `ValueError` it raises (then "
        "`chunked_loss=\"auto\"` keeps the stock loss for it), **not checked** when the stock model's own loss "
        "fails on that batch (nothing to compare with)."),
        ("- **not built**: the generic shrinker cannot build this family tiny (the reason is the error); "
        "its status is unknown, so treat it as unsupported."),
        "",
        f"Totals: {counts[STATUS_EXACT]} exact, {counts[STATUS_REFUSED]} refused, "
        f"{counts[STATUS_NOT_BUILT]} not built" + (f", **{counts[STATUS_WRONG]} WRONG**" if counts[STATUS_WRONG] else "")
        + ".",
        "",
        _HEADER,
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        worst = "" if r.worst is None else f"{r.worst:.1e}"
        lines.append(f"| {r.model_type} | {r.class_name} | {r.status} | {worst} | {_cell(r.loss)} | {_cell(r.reason)} |")
    return "\n".join(lines) + "\n"


def read_table(text: str) -> tuple[str | None, dict[str, tuple[str, str, str]]]:
    """``(transformers version, {model type: (status, chunked loss, reason)})`` of a docs/models.md text."""
    import re

    m = re.search(r"^transformers (\S+?),", text, re.MULTILINE)
    rows = {}
    body = text.split(_HEADER, 1)[1] if _HEADER in text else ""
    for line in body.splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 6:
            rows[cells[0]] = (cells[2], cells[4], cells[5])
    return (m.group(1) if m else None), rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m anchorcontext.zoo",
                                description="Check every causal LM of the installed transformers against the oracle.")
    p.add_argument("families", nargs="*", help="model types (default: all causal LMs)")
    p.add_argument("--write", metavar="PATH", help="write the support table (docs/models.md) there")
    args = p.parse_args(argv)

    def show(r):
        w = "" if r.worst is None else f"{r.worst:.1e}"
        print(f"{r.model_type:28s} {r.status:10s} {w:8s} {r.seconds:5.1f}s {r.reason[:160]}", flush=True)

    results = run_all(args.families, progress=show)
    if args.write:
        with open(args.write, "w") as f:
            f.write(table(results))
        print(f"wrote {args.write}")
    wrong = [r.model_type for r in results if r.status == STATUS_WRONG]
    if wrong:
        print(f"WRONG (accepted and not exact): {wrong}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
