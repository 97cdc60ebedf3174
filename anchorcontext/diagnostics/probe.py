"""The probing machinery of the RoPE drift diagnostics: precision settings, a probing attention function
that accumulates the measured terms on the fly, and the context manager that runs a model under it.

The measurements and their drivers are in :mod:`.rope`.

How (one forward per sequence and setting)
------------------------------------------
The same sequence is batched at every offset: row 0 at the reference ``Δ2``, then one row per ``Δ1``;
``Δ2`` itself is always among the ``Δ1`` rows as a **control** that must give exactly 0 (it does on CPU;
a non-zero control means the kernels are not batch-invariant and the figures carry that noise). A probing
attention function, registered with ``transformers.AttentionInterface`` under :data:`PROBE_NAME`, receives
the post-RoPE ``q``/``k``, computes the scores itself with the causal mask applied by itself (transformers'
mask builder would read the jump in position ids of the anchor layout as packed documents, so the mask
function registered beside it returns ``None``), accumulates the per-row, first-key, per-key and logit
terms of every layer on the fly, and returns the normal attention output so the forward continues. Only
one row's ``(H, L, L)`` matrices live at a time; the LM head is skipped (the base model runs).

For a causal model the first ``T`` rows of a length-``L`` run are the run on the first ``T`` tokens, so
one forward at ``L = max(lengths)`` yields every prefix length ``T`` (D and D_logit per length).

Score semantics are those of transformers' eager attention (what ``output_attentions=True`` reads):
``S = (q @ kᵀ) * scaling`` in the q/k dtype, softmax in at least float32, probabilities cast to the value
dtype for ``P @ V``. Dropout is never applied.

Precision settings (:class:`PrecisionSetting`, registry :data:`SETTINGS`)
----------------------------------------------------------------------
* ``bf16`` (a): the model in BF16 as trained; today's HF rotary path (``angles="fp32"``: ``m·θ`` in fp32,
  cos/sin cast to bf16, rotation in bf16).
* ``bf16_rope_fp32`` (b): model in BF16, RoPE rotation and ``q·k`` in FP32. Design: a forward pre-hook on
  every ``*RotaryEmbedding`` module hands it an fp32 view of its input, so the module's own code (any
  ``rope_type``) returns fp32 cos/sin; ``q*cos + rotate_half(q)*sin`` then runs in fp32 by type
  promotion, and the probe computes ``q·k`` and the softmax in fp32; the attention output is cast back
  to bf16 so everything else stays bf16. The dtype the probe actually received is recorded
  (``rotated_dtype``) — a model that casts q/k back after rotating would show ``bfloat16`` there.
* ``bf16_anchor`` (c): AnchorAttention's layout: position ids ``[0, Δ+1, Δ+2, …]`` (the first token keeps
  position 0). This changes the true relative distances to the first token, so exact RoPE does not give 0
  here: ``fp32_anchor`` is the same layout in FP32, and only the excess over it is due to precision.
* ``fp32`` (d): FP32 control. ``fp64``: float64 ground truth (angles and cos/sin in float64 too).
* ``bf16_angles_bf16``: the older code path in which the angle ``m·θ`` itself is computed in bf16
  (positions above 256 round to even numbers, 512 to multiples of 4, ...); ``angles="model_dtype"``.
* ``bf16_qk_fp32``: rotation in bf16 but ``q·k`` in fp32 (what fused SDPA/flash kernels accumulate in).
* ``bf16_random``: randomly initialised weights in BF16 (the paper's third setting).

Models are cast the way ``from_pretrained(dtype=...)`` loads them: weights cast, the rotary ``inv_freq``
buffers kept in float32 (a plain ``model.to(torch.bfloat16)`` would round them as well).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

PROBE_NAME = "anchorcontext_probe"
PROBE_KWARG = "anchorcontext_probe_state"
PAPER_OFFSETS = (0, 2, 4, 6, 8, 10, 12, 14, 15, 17, 18, 20, 22, 50, 100, 200, 500, 1000, 2000)
PAPER_REFERENCE_OFFSET = 16
PAPER_LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
ROW_WEIGHTS = ("mean", "paper", "sum")
LAYOUTS = ("shift", "anchor")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


# ------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class PrecisionSetting:
    """One way of running the model for the measurement.

    ``dtype``: the model's dtype (weights and activations). ``rope``: ``"model"`` (the model's rotary path
    as is) or ``"fp32"`` (cos/sin and the rotation in fp32). ``qk``: ``"model"`` (scores in the q/k dtype,
    as eager attention) or ``"fp32"`` (q/k upcast before the dot product). ``angles``: ``"fp32"`` (HF
    today: ``position.float() * inv_freq.float()``) or ``"model_dtype"`` (positions, ``inv_freq``, angle
    and cos/sin in the model dtype: the older bf16 path, or exact float64 ground truth). ``layout``:
    ``"shift"`` (positions ``Δ … Δ+L−1``) or ``"anchor"`` (``[0, Δ+1, …, Δ+L−1]``). ``init``:
    ``"pretrained"`` (the given weights) or ``"random"`` (a fresh model from the same config, seeded).
    """

    name: str
    dtype: str = "bfloat16"
    rope: str = "model"
    qk: str = "model"
    angles: str = "fp32"
    layout: str = "shift"
    init: str = "pretrained"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        for fld, allowed in (
            ("dtype", tuple(DTYPES)),
            ("rope", ("model", "fp32")),
            ("qk", ("model", "fp32")),
            ("angles", ("fp32", "model_dtype")),
            ("layout", LAYOUTS),
            ("init", ("pretrained", "random")),
        ):
            if getattr(self, fld) not in allowed:
                raise ValueError(f"{fld} must be one of {allowed}, got {getattr(self, fld)!r}")
        if self.rope == "fp32" and self.angles == "model_dtype":
            raise ValueError("rope='fp32' computes angles and rotation in fp32; it cannot use angles='model_dtype'")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        parts = [self.dtype, f"layout={self.layout}", f"angles={self.angles}"]
        if self.rope != "model":
            parts.append(f"rope={self.rope}")
        if self.qk != "model":
            parts.append(f"qk={self.qk}")
        if self.init != "pretrained":
            parts.append(f"init={self.init}")
        return ", ".join(parts)


SETTINGS: dict[str, PrecisionSetting] = {
    s.name: s
    for s in (
        PrecisionSetting(name="bf16"),
        PrecisionSetting(name="bf16_rope_fp32", rope="fp32", qk="fp32"),
        PrecisionSetting(name="bf16_anchor", layout="anchor"),
        PrecisionSetting(name="fp32_anchor", dtype="float32", layout="anchor"),
        PrecisionSetting(name="fp32", dtype="float32"),
        PrecisionSetting(name="fp64", dtype="float64", angles="model_dtype"),
        PrecisionSetting(name="fp64_anchor", dtype="float64", angles="model_dtype", layout="anchor"),
        PrecisionSetting(name="bf16_angles_bf16", angles="model_dtype"),
        PrecisionSetting(name="bf16_qk_fp32", qk="fp32"),
        PrecisionSetting(name="bf16_random", init="random"),
    )
}
#: (a) BF16, (b) RoPE+q·k in FP32, (c) anchor layout with its FP32 control, (d) FP32.
DEFAULT_SETTINGS = ("bf16", "bf16_rope_fp32", "bf16_anchor", "fp32_anchor", "fp32")


def get_setting(setting: str | PrecisionSetting) -> PrecisionSetting:
    """A :class:`PrecisionSetting` from itself or its name in :data:`SETTINGS`."""
    if isinstance(setting, PrecisionSetting):
        return setting
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {sorted(SETTINGS)} or a PrecisionSetting, got {setting!r}")
    return SETTINGS[setting]


# ------------------------------------------------------------------------------------- pure helpers


def row_weights(length: int, kind: str = "mean", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Row weights ``n: (length,)`` for Eq. 4: ``"mean"`` ``1/(i+1)``, ``"paper"`` ``1/(L−i)``, ``"sum"`` 1."""
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    i = torch.arange(length, dtype=dtype)
    if kind == "mean":
        return 1.0 / (i + 1)
    if kind == "paper":
        return 1.0 / (length - i)
    if kind == "sum":
        return torch.ones(length, dtype=dtype)
    raise ValueError(f"row_weight must be one of {ROW_WEIGHTS}, got {kind!r}")


def shifted_position_ids(length: int, offsets: Sequence[int], layout: str = "shift") -> torch.Tensor:
    """``(len(offsets), length)`` int64 position ids: ``Δ + arange(L)``; ``layout="anchor"`` pins column 0 at 0.

    ``"anchor"`` gives ``[0, Δ+1, Δ+2, …, Δ+L−1]``: AnchorAttention's layout, where the anchor keeps
    position 0 while the document after it sits at an arbitrary offset.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    pos = torch.arange(length, dtype=torch.long)[None, :] + torch.tensor(list(offsets), dtype=torch.long)[:, None]
    if layout == "anchor":
        pos[:, 0] = 0
    return pos


def deviation_terms(
    probs_ref: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor, *, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row, first-key and per-key terms of ``|A − A_ref|``, heads summed; results float64.

    ``probs_ref``, ``probs``: ``(..., L, L)`` attention probabilities (rows = queries, masked entries 0);
    leading dimensions (heads) are summed. ``weights``: ``(L,)`` row weights ``n``. Returns
    ``row: (L,)`` ``Σ_j |ΔA_ij|``, ``first: (L,)`` ``|ΔA_i0|`` and ``key: (L,)`` ``Σ_i n_i |ΔA_ij|``;
    ``(weights * row).sum() == key.sum()`` is Eq. 4 for one layer. Sums run in the dtype of ``probs``
    (all terms are non-negative: no cancellation). ``inplace=True`` overwrites ``probs``.
    """
    if probs_ref.shape != probs.shape or probs.dim() < 2 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(
            f"probs must be (..., L, L) and match probs_ref; got {tuple(probs.shape)}, {tuple(probs_ref.shape)}"
        )
    m = (probs.sub_(probs_ref) if inplace else probs - probs_ref).abs_()
    m = m.reshape(-1, *m.shape[-2:]).sum(0)
    return m.sum(-1).double(), m[:, 0].double(), (weights.to(m.dtype) @ m).double()


# ----------------------------------------------------------------------------------- probe function


class ProbeState:
    """Accumulators of one forward: ``n_rows`` batch rows (row 0 = reference), one entry per layer call."""

    def __init__(self, *, n_rows: int, length: int, weights: torch.Tensor, qk_upcast: bool,
                 on_layer: Callable[[], None] | None = None):  # fmt: skip
        self.n_rows, self.length, self.weights, self.qk_upcast = n_rows, length, weights, qk_upcast
        self.on_layer = on_layer
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        self.calls = 0
        self.rotated_dtype: torch.dtype | None = None
        self.score_dtype: torch.dtype | None = None
        self._mask_cache: dict[Any, torch.Tensor] = {}

    def _masked(self, L: int, sliding_window, device) -> torch.Tensor:
        """``(L, L)`` bool, True where key ``j`` is hidden from query ``i`` (``j > i``, or outside the window)."""
        key = (L, sliding_window, str(device))
        if key not in self._mask_cache:
            i = torch.arange(L, device=device)
            allowed = i[None, :] <= i[:, None]
            if sliding_window is not None:
                allowed &= i[None, :] > i[:, None] - int(sliding_window)
            self._mask_cache[key] = ~allowed
        return self._mask_cache[key]

    def attend(self, module, query, key, value, scaling, sliding_window, softcap) -> torch.Tensor:
        B, H, L, D = query.shape
        Hkv, G = key.shape[1], H // key.shape[1]
        if (B, L) != (self.n_rows, self.length):
            raise RuntimeError(f"probe expected (rows, L) = {(self.n_rows, self.length)}, got {(B, L)}")
        qk_dtype = torch.promote_types(query.dtype, key.dtype)
        if self.qk_upcast:
            qk_dtype = torch.promote_types(qk_dtype, torch.float32)
        acc = torch.promote_types(qk_dtype, torch.float32)
        self.rotated_dtype, self.score_dtype = query.dtype, qk_dtype
        scale = 1.0 / math.sqrt(D) if scaling is None else float(scaling)
        masked = self._masked(L, sliding_window, query.device)

        def scores(b: int) -> torch.Tensor:  # (H, L, L) in qk dtype; eager semantics: matmul and scale in qk dtype
            q = query[b].to(qk_dtype).reshape(Hkv, G * L, D)  # head h uses kv head h // G, as repeat_kv
            s = torch.matmul(q, key[b].to(qk_dtype).transpose(-1, -2)).mul_(scale).view(H, L, L)
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            return s

        def probs(s: torch.Tensor) -> torch.Tensor:  # consumes s; softmax in acc (>= float32)
            return torch.softmax(s.masked_fill_(masked, float("-inf")), dim=-1, dtype=acc)

        def apply(p: torch.Tensor, b: int) -> torch.Tensor:  # (L, H, D)
            o = torch.matmul(p.to(value.dtype).view(Hkv, G * L, L), value[b])
            return o.view(H, L, D).transpose(0, 1)

        out = torch.empty(B, L, H, D, dtype=value.dtype, device=value.device)
        rec = {k: torch.zeros(B, L, dtype=torch.float64) for k in ("row", "first", "key", "logit0")}
        weights = self.weights.to(device=query.device, dtype=acc)
        s = scores(0)
        s0_ref = s[:, :, 0].to(acc, copy=True)  # s is masked in place next
        p_ref = probs(s)
        out[0] = apply(p_ref, 0)
        for b in range(1, B):
            s = scores(b)
            rec["logit0"][b] = (s[:, :, 0].to(acc) - s0_ref).abs_().sum(0).double().cpu()
            p = probs(s)
            del s
            out[b] = apply(p, b)
            row, first, keyc = deviation_terms(p_ref, p, weights, inplace=True)  # p is overwritten
            rec["row"][b], rec["first"][b], rec["key"][b] = row.cpu(), first.cpu(), keyc.cpu()
            del p
        layer = getattr(module, "layer_idx", None)
        self.layers[self.calls if layer is None else int(layer)] = rec
        self.calls += 1
        if self.on_layer is not None:
            self.on_layer()
        return out


def _probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                     softcap=None, **kwargs):  # fmt: skip
    """``AttentionInterface`` function: q ``(B,H,L,D)``, k/v ``(B,Hkv,L,D)`` (post-RoPE) -> ``((B,L,H,D), None)``.

    Runs only inside :func:`probe_model` forwards, which pass the accumulator state as the
    ``anchorcontext_probe_state`` kwarg. ``attention_mask`` is ignored (the probe applies causality itself).
    """
    state = kwargs.get(PROBE_KWARG)
    if state is None:
        raise RuntimeError(
            f"attention implementation {PROBE_NAME!r} only runs inside anchorcontext.diagnostics probes "
            "(no probe state was passed); restore the model's attention implementation"
        )
    if getattr(module, "is_causal", True) is False:
        raise ValueError(
            f"non-causal attention module {type(module).__name__}: the RoPE drift diagnostic needs a causal LM"
        )
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) are not supported by the RoPE drift probe")
    return state.attend(module, query, key, value, scaling, sliding_window, softcap), None


def _no_mask(*args, **kwargs):
    """Mask function for the probe: no mask is built (the probe applies the causal mask itself)."""


def register_probe() -> str:
    """Register :data:`PROBE_NAME` with ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(PROBE_NAME, _probe_attention)
    AttentionMaskInterface.register(PROBE_NAME, _no_mask)
    return PROBE_NAME


# ----------------------------------------------------------------------------------- model handling


def base_model(model) -> torch.nn.Module:
    """The decoder without the LM head (``model.model`` for ``*ForCausalLM``), else ``model`` itself."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, torch.nn.Module) else model


def rotary_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every ``*RotaryEmbedding`` module (the producers of cos/sin)."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]


def check_model(model) -> None:
    """Raise ``ValueError`` unless ``model`` is a causal, RoPE, AttentionInterface-based HF model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"model {type(model).__name__} is an encoder-decoder; the diagnostic needs a causal decoder-only LM"
        )
    noncausal = [n for n, m in model.named_modules() if getattr(m, "is_causal", None) is False]
    if noncausal:
        raise ValueError(
            f"model {type(model).__name__} is not causal ({noncausal[0]}.is_causal is False"
            f"{f' and {len(noncausal) - 1} more' if len(noncausal) > 1 else ''}); the diagnostic needs a causal LM"
        )
    if not rotary_modules(model):
        raise ValueError(
            f"model {type(model).__name__} has no *RotaryEmbedding module: the diagnostic needs a RoPE model"
        )


def _rotary_buffers(model) -> dict[str, dict[str, torch.Tensor]]:
    return {
        n: {b: t.detach().float().clone() for b, t in m.named_buffers(recurse=False) if t.is_floating_point()}
        for n, m in rotary_modules(model)
    }


def _restore_rotary_buffers(model, saved: dict[str, dict[str, torch.Tensor]]) -> None:
    mods = dict(model.named_modules())
    for name, bufs in saved.items():
        for b, t in bufs.items():
            setattr(mods[name], b, t.to(getattr(mods[name], b).device))


def model_for_setting(model, setting: str | PrecisionSetting, *, seed: int = 0):
    """``model`` itself when its dtype already matches ``setting``, else a cast copy (or a random-init model).

    Casting mirrors ``from_pretrained(dtype=...)``: every weight is cast, rotary ``inv_freq`` buffers stay
    float32. ``init="random"`` builds ``type(model)(config)`` under ``torch.manual_seed(seed)`` (torch's
    global RNG is restored afterwards). The input model is never modified.
    """
    setting = get_setting(setting)
    dtype = setting.torch_dtype
    device = next(model.parameters()).device
    if setting.init == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = type(model)(copy.deepcopy(model.config))
        saved = _rotary_buffers(fresh)
        fresh = fresh.to(device=device, dtype=dtype).eval()
        _restore_rotary_buffers(fresh, saved)
        return fresh
    if next(model.parameters()).dtype == dtype:
        return model
    saved = _rotary_buffers(model)
    work = copy.deepcopy(model).to(dtype=dtype).eval()
    _restore_rotary_buffers(work, saved)
    return work


def _rope_fp32_pre_hook(module, args, kwargs):
    """Hand the rotary module an fp32 input: its cos/sin come out in fp32 (the input only sets dtype/device)."""
    if args:
        x = args[0]
        args = (x.to(torch.promote_types(x.dtype, torch.float32)),) + tuple(args[1:])
    elif "x" in kwargs:
        kwargs = dict(kwargs, x=kwargs["x"].to(torch.promote_types(kwargs["x"].dtype, torch.float32)))
    return args, kwargs


def _angles_in(module, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``cat(m·θ, m·θ)`` with positions, ``inv_freq``, angle and cos/sin all in ``dtype``."""
    freqs = position_ids[..., None].to(dtype) * module.inv_freq.to(device=position_ids.device, dtype=dtype)
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = float(getattr(module, "attention_scaling", 1.0))
    return emb.cos() * scale, emb.sin() * scale


def _model_dtype_angle_hook(module, args, kwargs, output):
    x = args[0] if args else kwargs["x"]
    pos = args[1] if len(args) > 1 else kwargs["position_ids"]
    cos, sin = _angles_in(module, pos, x.dtype)
    if cos.shape != output[0].shape:
        raise ValueError(f"angles='model_dtype' cannot reproduce {type(module).__name__}'s cos/sin layout")
    return cos.to(output[0].dtype), sin.to(output[1].dtype)


def _check_angle_layout(model) -> None:
    """Raise ``ValueError`` unless every rotary module computes ``cat(m·θ, m·θ)`` from ``inv_freq`` (fp32 check)."""
    for name, mod in rotary_modules(model):
        if not isinstance(getattr(mod, "inv_freq", None), torch.Tensor):
            raise ValueError(
                f"angles='model_dtype' needs an inv_freq buffer; {name} ({type(mod).__name__}) has none"
            )
        pos = torch.arange(0, 4096, 97, device=mod.inv_freq.device)[None]
        x = torch.zeros(1, 1, device=mod.inv_freq.device, dtype=torch.float32)
        try:
            cos, _sin = mod(x, pos)
        except TypeError as e:
            raise ValueError(f"angles='model_dtype' cannot call {type(mod).__name__}(x, position_ids): {e}") from e
        mine = _angles_in(mod, pos, torch.float32)
        if cos.shape != mine[0].shape or (cos.float() - mine[0]).abs().max() > 1e-4:
            raise ValueError(f"angles='model_dtype' does not match {type(mod).__name__}'s own rotary layout")


@contextlib.contextmanager
def probe_model(model, setting: str | PrecisionSetting = "bf16"):
    """Switch ``model`` to the probing attention (and the setting's rotary hooks); restore on exit.

    Yields the base model (no LM head). The previous ``config._attn_implementation`` is restored and
    every hook removed even when the body raises.
    """
    setting = get_setting(setting)
    check_model(model)
    register_probe()
    previous = model.config._attn_implementation
    handles = []
    try:
        if setting.angles == "model_dtype":
            _check_angle_layout(model)
        model.set_attn_implementation(PROBE_NAME)
        for _, mod in rotary_modules(model):
            if setting.rope == "fp32":
                handles.append(mod.register_forward_pre_hook(_rope_fp32_pre_hook, with_kwargs=True))
            if setting.angles == "model_dtype":
                handles.append(mod.register_forward_hook(_model_dtype_angle_hook, with_kwargs=True))
        yield base_model(model)
    finally:
        for h in handles:
            h.remove()
        if previous is not None and model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
