"""BF16 RoPE drift: the measurements of arXiv 2411.13476 (§2.2, App. B) for any Hugging Face causal LM.

Exact RoPE makes attention a function of relative position only: shifting every position id by Δ leaves
the attention probabilities ``A`` unchanged. In BFloat16 it does not. We measure by how much.

Measurements (``Δ2`` is the reference offset, 16 in the paper)
---------------------------------------------------------------
* **Attention difference** (Eq. 4)::

      D(X, Δ1, Δ2) = Σ_layers Σ_heads Σ_i Σ_{j<=i} n_i · |A_ij(X, Δ1) − A_ij(X, Δ2)|

  ``A(X, Δ)`` is the ``(L, L)`` attention-probability matrix of one head when the position ids are
  ``Δ … Δ+L−1``. Row weights ``n_i`` (``row_weight=``): ``"mean"`` (default) ``n_i = 1/(i+1)``, i.e. each
  query row contributes the mean absolute change over the ``i+1`` keys it sees (the reading of the paper's
  normalisation in which every row counts alike and ``D`` for a prefix does not depend on the full length);
  ``"paper"``: ``n = (1/L, 1/(L−1), …, 1)`` exactly as printed (``n_i = 1/(L−i)``); ``"sum"``: ``n_i = 1``.
* **Per-key contribution**: the same sum split by key position ``j``; ``Σ_j c_j = D``. The first-token
  share is ``c_0 / D``; ``D`` with the first key excluded is ``D − c_0``.
* **First-token logit difference** (Eq. 5): ``D_logit(T) = (1/T) Σ_{i<T} Σ_{l,h} |S_i0(Δ1) − S_i0(Δ2)|``
  on the pre-softmax scores ``S`` (after ``scaling`` and ``softcap``), paper: ``Δ1 = 0, Δ2 = 16``.

The probe that computes these terms inside the forward, and the precision settings, are in :mod:`.probe`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .probe import (
    DEFAULT_SETTINGS,
    PAPER_LENGTHS,
    PAPER_OFFSETS,
    PAPER_REFERENCE_OFFSET,
    PROBE_KWARG,
    PROBE_NAME,
    SETTINGS,
    PrecisionSetting,
    ProbeState,
    base_model,
    check_model,
    deviation_terms,
    get_setting,
    model_for_setting,
    probe_model,
    register_probe,
    row_weights,
    shifted_position_ids,
)

# ------------------------------------------------------------------------------------------ results


@dataclass
class ShiftDeviation:
    """Raw accumulators of one setting, averaged over sequences.

    ``offsets``: the ``Δ1`` values (``reference_offset`` among them: the control). Tensors are float64,
    indexed ``[layer, offset, i]`` over query rows ``i < length``: ``row`` ``Σ_h Σ_j |ΔA_ij|``,
    ``first`` ``Σ_h |ΔA_i0|``, ``logit0`` ``Σ_h |ΔS_i0|``; ``key[layer, offset, j]`` is
    ``Σ_h Σ_i n_i |ΔA_ij|`` with the row weights of the full length.
    """

    setting: PrecisionSetting
    offsets: list[int]
    reference_offset: int
    length: int
    num_sequences: int
    row_weight: str
    row: torch.Tensor
    first: torch.Tensor
    key: torch.Tensor
    logit0: torch.Tensor
    rotated_dtype: str = ""
    score_dtype: str = ""
    seconds: float = 0.0

    def _T(self, length: int | None) -> int:
        T = self.length if length is None else int(length)
        if not 1 <= T <= self.length:
            raise ValueError(f"length must be in [1, {self.length}], got {length!r}")
        return T

    @property
    def control_index(self) -> int:
        return self.offsets.index(self.reference_offset)

    def attention_difference(self, length: int | None = None, per_layer: bool = False) -> torch.Tensor:
        """Eq. 4 for the prefix of ``length`` tokens: ``(n_offsets,)``, or ``(n_layers, n_offsets)``."""
        T = self._T(length)
        d = self.row[:, :, :T] @ row_weights(T, self.row_weight)
        return d if per_layer else d.sum(0)

    def first_token_contribution(self, length: int | None = None) -> torch.Tensor:
        """``c_0``: the part of Eq. 4 on key ``j = 0``, ``(n_offsets,)``."""
        T = self._T(length)
        return (self.first[:, :, :T] @ row_weights(T, self.row_weight)).sum(0)

    def first_token_share(self, length: int | None = None) -> torch.Tensor:
        """``c_0 / D`` per offset (NaN where ``D == 0``, e.g. the control)."""
        d = self.attention_difference(length)
        return torch.where(d > 0, self.first_token_contribution(length) / d.clamp_min(1e-300), float("nan"))

    def excluding_first_token(self, length: int | None = None) -> torch.Tensor:
        """Eq. 4 without key ``j = 0``: ``D − c_0``, ``(n_offsets,)``."""
        return self.attention_difference(length) - self.first_token_contribution(length)

    def logit_difference(self, length: int | None = None) -> torch.Tensor:
        """Eq. 5, ``(1/T) Σ_{i<T} Σ_{l,h} |S_i0(Δ1) − S_i0(Δ2)|`` per offset ``Δ1``: ``(n_offsets,)``."""
        T = self._T(length)
        return self.logit0[:, :, :T].sum((0, 2)) / T

    def per_key_contribution(self) -> torch.Tensor:
        """``c_j`` at the full length, layers summed: ``(n_offsets, length)``; rows sum to ``D``."""
        return self.key.sum(0)

    @property
    def control_max(self) -> float:
        """Largest |ΔA| term or |ΔS| term of the control row (``Δ1 = Δ2``); exactly 0 when kernels are batch-invariant."""
        c = self.control_index
        return float(max(self.row[:, c].abs().max(), self.logit0[:, c].abs().max()))

    def summary(self, length: int | None = None) -> float:
        """Mean of Eq. 4 over the non-control offsets."""
        d = self.attention_difference(length)
        keep = [k for k in range(len(self.offsets)) if k != self.control_index]
        return float(d[keep].mean()) if keep else 0.0

    def to_dict(self, lengths: Sequence[int] | None = None) -> dict:
        """Every derived number, JSON-ready (lists of floats), per length in ``lengths`` (default: full)."""
        lengths = [self.length] if lengths is None else [self._T(t) for t in lengths]
        per_len = {}
        for T in lengths:
            per_len[str(T)] = {
                "attention_difference": self.attention_difference(T).tolist(),
                "excluding_first_token": self.excluding_first_token(T).tolist(),
                "first_token_share": [None if math.isnan(v) else v for v in self.first_token_share(T).tolist()],
                "logit_difference": self.logit_difference(T).tolist(),
                "mean_attention_difference": self.summary(T),
            }
        return {
            "setting": asdict(self.setting),
            "description": self.setting.describe(),
            "offsets": list(self.offsets),
            "reference_offset": self.reference_offset,
            "control_offset_index": self.control_index,
            "control_max_abs": self.control_max,
            "length": self.length,
            "num_sequences": self.num_sequences,
            "row_weight": self.row_weight,
            "rotated_qk_dtype": self.rotated_dtype,
            "score_dtype": self.score_dtype,
            "seconds": self.seconds,
            "by_length": per_len,
            "attention_difference_per_layer": self.attention_difference(per_layer=True).T.tolist(),
            "per_key_contribution": self.per_key_contribution().tolist(),
        }


# ------------------------------------------------------------------------------------ measurement


def _check_input_ids(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (num_sequences, L) with L >= 2, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    return input_ids.long()


def check_offsets(offsets: Iterable[int], reference_offset: int) -> list[int]:
    """Validated ``Δ1`` list with ``reference_offset`` added as the control when absent (in sorted place
    when ``offsets`` is ascending, else at the end)."""
    offsets = list(offsets) if offsets is not None else []
    if not offsets:
        raise ValueError(f"offsets must be a non-empty list of Δ1 values, got {offsets!r}")
    for o in [*offsets, reference_offset]:
        if isinstance(o, bool) or not isinstance(o, int) or o < 0:
            raise ValueError(f"offsets and reference_offset must be non-negative ints, got {o!r}")
    if len(set(offsets)) != len(offsets):
        raise ValueError(f"offsets must not repeat, got {offsets!r}")
    if reference_offset in offsets:
        return offsets
    if offsets == sorted(offsets):  # keep an ascending list ascending (plots read better)
        return sorted([*offsets, reference_offset])
    return [*offsets, reference_offset]


def check_length(model, length: int, offsets: Sequence[int]) -> None:
    """Raise ``ValueError`` when positions up to ``max(offsets) + length − 1`` exceed ``max_position_embeddings``."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max(offsets) + length > int(limit):
        raise ValueError(
            f"length {length} with offset {max(offsets)} needs position ids up to {max(offsets) + length - 1}, "
            f"beyond the model's max_position_embeddings ({limit})"
        )


def probe_shift_deviation(
    model,
    input_ids,
    *,
    offsets: Sequence[int] = PAPER_OFFSETS,
    reference_offset: int = PAPER_REFERENCE_OFFSET,
    setting: str | PrecisionSetting = "bf16",
    row_weight: str = "mean",
    seed: int = 0,
    progress: Callable[[], None] | None = None,
    cast: bool = True,
) -> ShiftDeviation:
    """Run one setting on ``input_ids: (N, L)`` (each row one sequence) and return the accumulators.

    One forward per sequence with ``len(offsets) + 1`` batch rows (the reference first). ``model`` is
    cast per :func:`model_for_setting` (a copy when its dtype differs; ``cast=False``: used as given, already
    prepared); it is never modified. Accumulates
    in float64 on the host; ``progress`` is called once per attention layer. Deterministic.
    """
    setting = get_setting(setting)
    ids = _check_input_ids(input_ids)
    deltas = check_offsets(offsets, reference_offset)
    row_weights(2, row_weight)  # validates the name
    N, L = ids.shape
    check_model(model)
    check_length(model, L, [reference_offset, *deltas])
    work = model_for_setting(model, setting, seed=seed) if cast else model
    device = next(work.parameters()).device
    pos = shifted_position_ids(L, [reference_offset, *deltas], setting.layout).to(device)
    weights = row_weights(L, row_weight)
    n_rows = len(deltas) + 1
    total: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    rotated = score = ""
    with probe_model(work, setting) as net, torch.inference_mode():
        for n in range(N):
            state = ProbeState(n_rows=n_rows, length=L, weights=weights.to(device),
                                qk_upcast=setting.qk == "fp32", on_layer=progress)  # fmt: skip
            batch = ids[n : n + 1].expand(n_rows, L).to(device)
            net(input_ids=batch, position_ids=pos, use_cache=False, **{PROBE_KWARG: state})
            if not state.layers:
                raise ValueError(
                    f"{type(model).__name__} never called the probing attention: it does not dispatch through "
                    "transformers.AttentionInterface"
                )
            for k in ("row", "first", "key", "logit0"):
                stacked = torch.stack([state.layers[i][k][1:] for i in sorted(state.layers)])  # (layers, n_off, L)
                total[k] = stacked / N if k not in total else total[k] + stacked / N
            rotated, score = (
                str(state.rotated_dtype).replace("torch.", ""),
                str(state.score_dtype).replace("torch.", ""),
            )
    if work is not model:
        del work
    return ShiftDeviation(
        setting=setting, offsets=deltas, reference_offset=reference_offset, length=L, num_sequences=N,
        row_weight=row_weight, row=total["row"], first=total["first"], key=total["key"], logit0=total["logit0"],
        rotated_dtype=rotated, score_dtype=score, seconds=time.perf_counter() - t0,
    )  # fmt: skip


def attention_difference(model, input_ids, offsets=PAPER_OFFSETS, reference_offset=PAPER_REFERENCE_OFFSET, *,
                         setting="bf16", length=None, row_weight="mean") -> dict[int, float]:  # fmt: skip
    """Eq. 4, ``{Δ1: D}`` averaged over the sequences of ``input_ids: (N, L)`` (prefix ``length``)."""
    r = probe_shift_deviation(model, input_ids, offsets=offsets, reference_offset=reference_offset,
                              setting=setting, row_weight=row_weight)  # fmt: skip
    return dict(zip(r.offsets, r.attention_difference(length).tolist()))


def per_key_contribution(model, input_ids, offsets=PAPER_OFFSETS, reference_offset=PAPER_REFERENCE_OFFSET, *,
                         setting="bf16", row_weight="mean") -> dict[int, torch.Tensor]:  # fmt: skip
    """``{Δ1: c (L,)}``: Eq. 4 split by key position; ``c[0] / c.sum()`` is the first-token share."""
    r = probe_shift_deviation(model, input_ids, offsets=offsets, reference_offset=reference_offset,
                              setting=setting, row_weight=row_weight)  # fmt: skip
    return dict(zip(r.offsets, r.per_key_contribution()))


def first_token_logit_difference(model, input_ids, lengths: Sequence[int], *, delta1: int = 0,
                                 delta2: int = PAPER_REFERENCE_OFFSET, setting="bf16") -> dict[int, float]:  # fmt: skip
    """Eq. 5, ``{T: D_logit}`` for each prefix length ``T`` of ``input_ids: (N, L)`` (``L >= max(lengths)``)."""
    lengths = list(lengths)
    if not lengths:
        raise ValueError(f"lengths must be a non-empty list, got {lengths!r}")
    ids = _check_input_ids(input_ids)
    if max(lengths) > ids.shape[1] or min(lengths) < 1:
        raise ValueError(f"lengths must be in [1, {ids.shape[1]}] (the sequence length), got {lengths!r}")
    r = probe_shift_deviation(model, ids[:, : max(lengths)], offsets=[delta1], reference_offset=delta2, setting=setting)
    k = r.offsets.index(delta1)
    return {T: float(r.logit_difference(T)[k]) for T in lengths}


@dataclass
class RopeDriftReport:
    """Results of :func:`compare_settings`: one :class:`ShiftDeviation` per setting name, in run order."""

    results: dict[str, ShiftDeviation]
    lengths: list[int]
    logit_offset: int = 0
    meta: dict = field(default_factory=dict)

    def control_for(self, name: str) -> str | None:
        """The run setting whose D stands for exact arithmetic for ``name``'s layout (float32, else float64)."""
        s = self.results[name].setting
        for dtype in ("float32", "float64"):
            for other, r in self.results.items():
                o = r.setting
                if (o.dtype, o.layout, o.init, o.rope, o.qk) == (
                    dtype,
                    s.layout,
                    s.init,
                    "model",
                    "model",
                ) and other != name:
                    return other
        return None

    def precision_excess(self, name: str, length: int | None = None) -> float:
        """Mean D minus its exact-arithmetic part: D itself for ``layout="shift"`` (exact RoPE gives 0);
        ``D − D(control)`` for ``"anchor"`` (NaN without a float32/float64 control of that layout)."""
        r = self.results[name]
        if r.setting.layout == "shift":
            return r.summary(length)
        ctrl = self.control_for(name)
        return r.summary(length) - self.results[ctrl].summary(length) if ctrl else float("nan")

    def rows(self, length: int | None = None) -> list[dict]:
        """One summary dict per setting; ``removed`` = ``1 − excess / excess(bf16)``."""
        base = self.precision_excess("bf16", length) if "bf16" in self.results else float("nan")
        out = []
        for name, r in self.results.items():
            T = r._T(length)
            keep = [k for k in range(len(r.offsets)) if k != r.control_index]
            share = r.first_token_share(T)[keep]
            excess = self.precision_excess(name, T)
            lk = r.offsets.index(self.logit_offset) if self.logit_offset in r.offsets else keep[0]
            out.append({
                "setting": name,
                "description": r.setting.describe(),
                "length": T,
                "mean_D": r.summary(T),
                "mean_D_excluding_first_token": float(r.excluding_first_token(T)[keep].mean()),
                "first_token_share": float(share[~share.isnan()].mean()) if (~share.isnan()).any() else float("nan"),
                "D_logit": float(r.logit_difference(T)[lk]),
                "D_logit_offset": r.offsets[lk],
                "control_max_abs": r.control_max,
                "precision_excess": excess,
                "control_setting": self.control_for(name) if r.setting.layout != "shift" else None,
                "removed_vs_bf16": (1.0 - excess / base) if base and not math.isnan(base) and name != "bf16" else None,
                "rotated_qk_dtype": r.rotated_dtype,
                "seconds": r.seconds,
            })  # fmt: skip
        return out

    def table(self, length: int | None = None) -> str:
        """Terminal tables: the per-setting summary, then D per offset (columns: settings)."""
        rows = self.rows(length)

        def f(v):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return "—"
            return f"{v:.3e}" if isinstance(v, float) else str(v)

        head = ["setting", "mean D", "D excl. first", "first share", "D_logit", "precision part", "removed", "control"]
        lines = [head]
        for r in rows:
            rem = r["removed_vs_bf16"]
            lines.append([
                r["setting"], f(r["mean_D"]), f(r["mean_D_excluding_first_token"]),
                "—" if math.isnan(r["first_token_share"]) else f"{100 * r['first_token_share']:.1f}%",
                f(r["D_logit"]), f(r["precision_excess"]), "—" if rem is None or math.isnan(rem) else f"{100 * rem:.1f}%",
                f"{r['control_max_abs']:.0e}",
            ])  # fmt: skip
        widths = [max(len(x[c]) for x in lines) for c in range(len(head))]
        fmt = lambda x: "  ".join(s.ljust(w) if c == 0 else s.rjust(w) for c, (s, w) in enumerate(zip(x, widths)))
        T = rows[0]["length"] if rows else length
        text = [f"RoPE shift deviation at L={T} (mean over Δ1 != Δ2; D_logit at Δ1={rows[0]['D_logit_offset'] if rows else ''})",
                fmt(lines[0]), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines[1:]]  # fmt: skip
        names = list(self.results)
        first = self.results[names[0]]
        text += ["", f"D(Δ1) per setting at L={T} (reference Δ2={first.reference_offset}; * = control)"]
        cols = [["Δ1", *names]]
        for k, o in enumerate(first.offsets):
            mark = "*" if o == first.reference_offset else ""
            cols.append([f"{o}{mark}", *(f"{float(self.results[n].attention_difference(T)[k]):.3e}" for n in names)])
        w2 = [max(len(x[c]) for x in cols) for c in range(len(cols[0]))]
        text += ["  ".join(s.rjust(w) for s, w in zip(x, w2)) for x in cols]
        return "\n".join(text)

    def to_dict(self) -> dict:
        return {
            "meta": self.meta,
            "lengths": self.lengths,
            "summary": {str(T): self.rows(T) for T in self.lengths},
            "settings": {n: r.to_dict(self.lengths) for n, r in self.results.items()},
        }


def compare_settings(
    model,
    input_ids,
    *,
    settings: Sequence[str | PrecisionSetting] = DEFAULT_SETTINGS,
    offsets: Sequence[int] = PAPER_OFFSETS,
    reference_offset: int = PAPER_REFERENCE_OFFSET,
    lengths: Sequence[int] | None = None,
    row_weight: str = "mean",
    logit_offset: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> RopeDriftReport:
    """Run every setting on ``input_ids: (N, L)`` and collect a :class:`RopeDriftReport`.

    ``lengths`` (default ``[L]``): prefix lengths to report (each ``<= L``). Settings sharing a dtype and
    init reuse one cast copy, released before the next group. ``progress`` shows a tqdm bar (one tick per
    attention layer). ``logit_offset`` is the ``Δ1`` of Eq. 5 (paper: 0).
    """
    from tqdm.auto import tqdm

    ids = _check_input_ids(input_ids)
    chosen = [get_setting(s) for s in settings]
    if not chosen:
        raise ValueError(f"settings must be non-empty, got {list(settings)!r}")
    if len({s.name for s in chosen}) != len(chosen):
        raise ValueError(f"settings must have distinct names, got {[s.name for s in chosen]!r}")
    lengths = [ids.shape[1]] if not lengths else sorted({int(t) for t in lengths})
    if lengths[0] < 2 or lengths[-1] > ids.shape[1]:
        raise ValueError(f"lengths must lie in [2, {ids.shape[1]}] (the sequence length), got {lengths!r}")
    deltas = check_offsets(offsets, reference_offset)
    check_model(model)
    check_length(model, ids.shape[1], [reference_offset, *deltas])
    n_layers = getattr(model.config, "num_hidden_layers", None)
    bar = tqdm(total=n_layers * len(chosen) * ids.shape[0] if n_layers else None, desc="rope drift",
               unit="layer", disable=not progress)  # fmt: skip
    results: dict[str, ShiftDeviation] = {}
    group_of = lambda s: (s.dtype, s.init)
    try:
        for key in dict.fromkeys(group_of(s) for s in chosen):
            work = model_for_setting(model, next(s for s in chosen if group_of(s) == key), seed=seed)
            for s in (s for s in chosen if group_of(s) == key):
                bar.set_description(f"rope drift [{s.name}]")
                results[s.name] = probe_shift_deviation(
                    work, ids, offsets=deltas, reference_offset=reference_offset, setting=s,
                    row_weight=row_weight, seed=seed, progress=lambda: bar.update(1), cast=False,
                )  # fmt: skip
            del work
    finally:
        bar.close()
    ordered = {s.name: results[s.name] for s in chosen}
    return RopeDriftReport(results=ordered, lengths=lengths, logit_offset=logit_offset)


# ------------------------------------------------------------------------------------------ inputs


def sample_sequences(
    tokenizer,
    length: int,
    num_sequences: int = 1,
    *,
    seed: int = 0,
    docs: Sequence[dict] | None = None,
    first_token: str = "bos",
) -> torch.Tensor:
    """``(num_sequences, length)`` int64 windows of real text (default corpus: :func:`assets.stdlib_documents`).

    Documents are visited in a ``seed``-shuffled order; each long enough one gives one window at a
    ``seed``-random token offset. ``first_token="bos"`` makes column 0 the tokenizer's BOS (EOS when it has
    none), as in the paper's sequences and AnchorAttention's anchor; ``"none"`` keeps raw text.
    """
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    if not isinstance(num_sequences, int) or num_sequences < 1:
        raise ValueError(f"num_sequences must be a positive int, got {num_sequences!r}")
    if first_token not in ("bos", "none"):
        raise ValueError(f"first_token must be 'bos' or 'none', got {first_token!r}")
    prefix: list[int] = []
    if first_token == "bos":
        tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if tid is None:
            raise ValueError("first_token='bos' but the tokenizer has neither a BOS nor an EOS token")
        prefix = [int(tid)]
    if docs is None:
        from ..assets import stdlib_documents

        docs = stdlib_documents()
    need = length - len(prefix)
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    out: list[list[int]] = []
    for idx in order:
        text = docs[idx]["text"]
        if len(text) < need:  # a token covers at least one character for every BPE we meet
            continue
        budget = 12 * need  # chars: tokenise a window, not a 400K-token file
        if len(text) > budget:
            start = rng.randrange(0, len(text) - budget + 1)
            text = text[start : start + budget]
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(toks) < need:
            continue
        s = rng.randrange(0, len(toks) - need + 1)
        out.append(prefix + list(toks[s : s + need]))
        if len(out) == num_sequences:
            return torch.tensor(out, dtype=torch.long)
    raise ValueError(f"the corpus has only {len(out)} documents of >= {need} tokens; asked for {num_sequences}")


__all__ = [
    "DEFAULT_SETTINGS",
    "PAPER_LENGTHS",
    "PAPER_OFFSETS",
    "PAPER_REFERENCE_OFFSET",
    "PROBE_NAME",
    "SETTINGS",
    "PrecisionSetting",
    "RopeDriftReport",
    "ShiftDeviation",
    "attention_difference",
    "base_model",
    "check_model",
    "compare_settings",
    "deviation_terms",
    "first_token_logit_difference",
    "get_setting",
    "model_for_setting",
    "per_key_contribution",
    "probe_model",
    "probe_shift_deviation",
    "register_probe",
    "row_weights",
    "sample_sequences",
    "shifted_position_ids",
]
