"""Per-device memory plan of a training step: weights, gradients, optimizer state, activations, attention, loss.

Pure arithmetic (no torch, no transformers at module load): :func:`plan_memory` takes the model's dimensions
(:class:`ModelDims`), the row length, the micro-batch, the world size, the Ulysses ``sp_size``, the engine and the
precision, and returns a :class:`MemoryPlan` whose components are bytes **per device** at the peak of one step
(the start of the backward pass, or the backward of the first recomputed layer under checkpointing).
:func:`format_plan` prints it in GiB (2**30 bytes).

Conventions and assumptions (Llama-like decoder: RMSNorm, GQA attention with RoPE, SwiGLU MLP):

* ``P`` parameters; ``N = world_size`` ranks share the ZeRO-3 / FSDP2 shards (under Ulysses the SP ranks are part
  of the ZeRO-3 group, so ``N`` counts DP x SP). ``a`` = bytes of the compute dtype (2 for bf16/fp16 weights or
  autocast, 4 for fp32).
* Per rank, the sequence dimension is ``L / sp_size`` for everything except attention, which runs on the whole
  row ``L`` for ``H / sp_size`` query heads and ``max(Hkv / sp_size, 1)`` key/value heads (replicated when
  ``Hkv < sp_size``).
* Activations saved per decoder layer and token (bytes): two RMSNorms ``2 * (4 + a) * h`` (the fp32 copy of the
  input and the output), q and o ``2 * a * H * d``, k and v ``2 * a * Hkv * d``, the attention's log-sum-exp
  ``4 * H``, the MLP's gate, up, SiLU(gate) and product ``4 * a * I``. With gradient checkpointing (one checkpoint
  per decoder layer, HF's) each layer keeps only its input ``a * h``; the backward of one layer recomputes that
  layer's saved set and adds its gradient working set.
* Loss path: stock HF ``ForCausalLMLoss`` upcasts the logits to fp32 and keeps the fp32 log-softmax; its backward
  holds the incoming and outgoing fp32 gradients beside it: 12 bytes per token and vocabulary entry, in bf16 and
  fp32 alike, because ``Trainer.training_step`` drops the model's output (the logits) before the backward
  (measured on CPU, logits dropped: 12.1 bytes in fp32 and bf16; held through the backward, as a loop that keeps
  ``outputs`` does: ``a + 12``, 16.1 / 14.1). The chunked loss
  (:mod:`anchorcontext.loss`) never holds the whole ``(T, V)`` logits; ``c = min(loss_chunk_tokens, T)``:

  - a plain ``nn.Linear`` head (engine ``ddp``) runs the fused Function, which computes the gradients in its
    forward: float32 logits and one ``logsumexp`` temporary of one chunk, plus the previous chunk's gradient while
    the next chunk's logits are made (8 bytes per chunk element with one chunk, 12 with several), a float32
    ``grad_W (V, h)`` and ``grad_h (T, h)`` held from the loss forward to its backward, whose scaling copies them
    once more (``2 T h a + V h (8, or 8 + a when the weights are 16-bit)``): the larger of the two phases counts;
  - a head that is not a plain ``nn.Linear`` (ZeRO-3's partitioned parameter, FSDP2's wrapped module) runs
    per-chunk checkpointed cross-entropy: the recompute of one chunk keeps no logits (the stock loss's 12 bytes per
    element, on one chunk), one chunk's head-weight gradient (``4 V h``) and the hidden-state gradient assembled from
    the chunks (``2 T h a``); measured alone on CPU, fp32, 8192 tokens x 49,152 in chunks of 2048: 1.327 GiB,
    4.6% above the plan (benchmarks/results/cpu/memory_plan.json).
* Peak: weights, optimizer state and persistent gradient buffers (DDP's, ZeRO-3's) are live throughout. The
  backward has a loss phase (every layer's saved tensors + the loss's buffers, no decoder ``.grad`` yet) and one
  phase per decoder layer (the loss freed; the layers not yet processed still hold their saved tensors, the
  processed ones have their gradients; worst at the first or the last layer). Only the largest phase counts: the
  row "not live at once (freed in backward)" subtracts what the listed rows hold but is never live together.
* Attention workspace: ``varlen`` gathers ``[anchor] + document`` K/V per layer (kept for the backward: one layer
  under checkpointing, every layer without); ``sdpa`` / ``flex`` run per document in O(L) extra memory; every
  backend adds one layer's ``dq, dk, dv``; Ulysses adds the all-to-all buffers of one layer; ``reference`` is the
  dense O(L^2) oracle.

What is not modelled: the CUDA caching allocator's fragmentation beyond the stated reserve, NCCL/DeepSpeed
buffers beyond the bucket sizes of the config, the data loader, and evaluation passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 2**30
ENGINES = ("ddp", "fsdp2", "zero3", "zero3_offload")
PRECISIONS = ("bfloat16", "float16", "float32")
MIXED = ("bf16", "fp16", "no")
ATTENTIONS = ("varlen", "sdpa", "flex", "reference")
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
OVERLAP = "not live at once (freed in backward)"


def _int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelDims:
    """The shapes of a Llama-like causal LM that decide its memory (counts, not bytes)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int | None = None  # default hidden_size // num_heads
    tied_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q/k/v
    name: str = ""

    def __post_init__(self):
        for n in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
            _int(n, getattr(self, n))
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                                 "give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _int("head_dim", self.head_dim)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_config(cls, config, *, name: str = "") -> ModelDims:
        """From a ``transformers`` config (or anything with the same attribute names)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = cfg.num_attention_heads
        return cls(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                   num_layers=cfg.num_hidden_layers, num_heads=heads,
                   num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, vocab_size=cfg.vocab_size,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                   tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
                   qkv_bias=getattr(cfg, "model_type", "") == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
                   name=name or getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", ""))

    @property
    def layer_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * h * self.intermediate_size + 2 * h  # + two RMSNorm weights

    @property
    def embedding_parameters(self) -> int:
        """Input embedding plus the LM head (once when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @property
    def parameters(self) -> int:
        return self.num_layers * self.layer_parameters + self.embedding_parameters + self.hidden_size


# The paper recipes' models (configs/*.yaml) and the CPU model: dims from their config.json, so a plan needs no
# download when a recipe names only the hub id.
KNOWN_MODELS: dict[str, ModelDims] = {
    "meta-llama/Meta-Llama-3-8B": ModelDims(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                                            num_kv_heads=8, vocab_size=128256, name="Llama-3-8B"),
    "meta-llama/Llama-2-7b-hf": ModelDims(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                                          num_kv_heads=32, vocab_size=32000, name="Llama-2-7B"),
    "Qwen/Qwen2.5-7B": ModelDims(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                                 num_kv_heads=4, vocab_size=152064, qkv_bias=True, name="Qwen2.5-7B"),
    "mistralai/Mistral-7B-v0.3": ModelDims(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                                           num_kv_heads=8, vocab_size=32768, name="Mistral-7B-v0.3"),
    "HuggingFaceTB/SmolLM2-135M": ModelDims(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                                            num_kv_heads=3, vocab_size=49152, tied_embeddings=True,
                                            name="SmolLM2-135M"),
}


@dataclass(kw_only=True)
class MemoryPlan:
    """Bytes per device at the step's peak, by component (insertion order = print order), and the verdict.

    ``components``: name -> bytes on the device. ``host``: name -> bytes in host RAM per rank (ZeRO-3 offload).
    ``device_memory``: bytes available per device, or None (then ``fits`` is None). ``inputs``: what was planned.
    ``variants``: totals of the same run under each engine x checkpointing x loss path (``format_plan`` prints them).
    """

    components: dict[str, int]
    host: dict[str, int] = field(default_factory=dict)
    device_memory: int | None = None
    device_name: str = ""
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def to_dict(self) -> dict:
        return {"components": dict(self.components), "total": self.total, "host": dict(self.host),
                "device_memory": self.device_memory, "device_name": self.device_name, "fits": self.fits,
                "notes": list(self.notes), "inputs": dict(self.inputs), "variants": dict(self.variants)}


def _state(m: ModelDims, *, engine: str, param_dtype: str, mixed_precision: str, world_size: int,
           zero3_max_live_parameters: int, zero3_sub_group_size: int, notes: list[str]):
    """(device components, host components, compute dtype bytes, persistent gradient bytes) for weights, gradients and
    optimizer state (AdamW: two moments). Persistent gradient bytes are allocated before the backward starts (DDP
    buckets, ZeRO-3's flat partition buffer); the rest (``.grad`` set to None between steps) appear layer by layer."""
    P, N = m.parameters, world_size
    w = _BYTES[param_dtype]
    mixed = mixed_precision != "no"
    a = 2 if (mixed or w == 2) else 4
    dev: dict[str, int] = {}
    host: dict[str, int] = {}
    if engine == "ddp":
        dev["weights"] = P * w
        if mixed and w == 4:
            dev["weights"] += P * 2
            notes.append("ddp: fp32 weights under bf16/fp16 autocast also hold the autocast cache of 16-bit weight "
                         "copies (2 bytes/param)")
        dev["gradients"] = P * w * (2 if N > 1 else 1)
        persistent = P * w if N > 1 else 0
        if N > 1:
            notes.append("ddp: gradients counted twice (the .grad tensors and DDP's buckets; "
                         "gradient_as_bucket_view=False, accelerate's default)")
        dev["optimizer state"] = 2 * P * w
        if w == 2:
            notes.append(f"ddp with {param_dtype} weights: torch AdamW keeps its moments in {param_dtype} and there "
                         "is no fp32 master copy (pure 16-bit training)")
    elif engine == "fsdp2":
        sw = 4 if mixed else w  # accelerate upcasts the sharded parameters to fp32 under mixed precision
        unit = max(m.layer_parameters, 1)
        root = m.embedding_parameters + m.hidden_size
        dev["weights"] = P * sw // N + (root + 2 * unit) * a
        dev["gradients"] = P * sw // N + unit * a
        persistent = 0
        dev["optimizer state"] = 2 * P * sw // N
        notes.append(f"fsdp2: shards over {N} ranks (fp32 under mixed precision: accelerate upcasts); unsharded: the "
                     "root (embeddings, LM head: not resharded after forward) + 2 decoder layers (current, prefetch) "
                     "in the compute dtype, 1 layer's gradients before reduce-scatter")
    else:
        live = min(zero3_max_live_parameters, P)
        gathered = live * a
        buckets = int(1.9 * m.hidden_size ** 2) * a  # reduce_bucket_size + prefetch bucket ("auto": h^2, 0.9 h^2)
        master = 4 * P // N if (mixed or w == 2) else 0
        step_tmp = 4 * min(zero3_sub_group_size, -(-P // N))
        if engine == "zero3":
            dev["weights"] = P * a // N + master + gathered
            dev["gradients"] = P * a // N + buckets
            dev["optimizer state"] = 8 * P // N + step_tmp
            notes.append(f"zero3: partitions over {N} ranks; weights = 16-bit partition + fp32 master + up to "
                         f"stage3_max_live_parameters={live:.3g} gathered parameters; optimizer state includes the fp32 "
                         "gradient of one sub_group at the step")
        else:
            dev["weights"] = gathered
            dev["gradients"] = buckets
            dev["optimizer state"] = 0
            host["weights (16-bit partition)"] = P * a // N
            host["fp32 master weights"] = 4 * P // N
            host["fp32 gradients"] = 4 * P // N
            host["optimizer state"] = 8 * P // N
            notes.append("zero3_offload: parameters and optimizer state in host RAM (per rank; x ranks per node); the "
                         "device holds the gathered parameters and the reduce buckets")
    if engine in ("zero3", "zero3_offload"):
        persistent = dev["gradients"]
    return dev, host, a, persistent


def plan_memory(*, model: ModelDims, seq_len: int, micro_batch: int = 1, world_size: int = 1, sp_size: int = 1,
                engine: str = "ddp", param_dtype: str = "bfloat16", mixed_precision: str = "bf16",
                gradient_checkpointing: bool = True, attention: str = "varlen", chunked_loss: bool = False,
                loss_chunk_tokens: int = 2048, num_documents: int = 1, device_memory_gib: float | None = None,
                device_name: str = "", device_reserve_gib: float = 1.0, fragmentation: float = 0.05,
                zero3_max_live_parameters: int = 10**9, zero3_sub_group_size: int = 10**9,
                variants: bool = True) -> MemoryPlan:
    """The per-device memory of one training step (forward, backward, AdamW step), by component, in bytes.

    ``seq_len``: tokens per row (``L``, anchor included); ``micro_batch``: rows per device per forward;
    ``world_size``: ranks (DP x SP); ``sp_size``: Ulysses group size (``L % sp_size == 0``; needs ``engine`` ZeRO-3).
    ``param_dtype``: the weights' dtype as loaded; ``mixed_precision``: ``bf16`` / ``fp16`` (autocast, fp32 master
    where the engine keeps one) or ``no``. ``attention``: the backend the run resolves to on the device (``auto`` on
    a GPU: ``varlen``). ``chunked_loss`` / ``loss_chunk_tokens``: the loss path. ``num_documents``: documents per
    row (only the ``varlen`` gather depends on it: ``L + num_documents`` gathered rows).
    ``device_memory_gib``: GiB per device, or None (``fits`` is then None). ``device_reserve_gib`` (CUDA context,
    NCCL) and ``fragmentation`` (a fraction of the rest) form the "runtime reserve" row; pass 0 and 0.0 for a CPU.
    ``zero3_*``: the DeepSpeed config's ``stage3_max_live_parameters`` and ``sub_group_size``.
    """
    if not isinstance(model, ModelDims):
        raise ValueError(f"model must be a ModelDims, got {type(model).__name__}")
    _int("seq_len", seq_len, 2)
    _int("micro_batch", micro_batch)
    _int("world_size", world_size)
    _int("sp_size", sp_size)
    _int("loss_chunk_tokens", loss_chunk_tokens)
    _int("num_documents", num_documents)
    _int("zero3_max_live_parameters", zero3_max_live_parameters)
    _int("zero3_sub_group_size", zero3_sub_group_size)
    _choice("engine", engine, ENGINES)
    _choice("param_dtype", param_dtype, PRECISIONS)
    _choice("mixed_precision", mixed_precision, MIXED)
    _choice("attention", attention, ATTENTIONS)
    for name, value in (("gradient_checkpointing", gradient_checkpointing), ("chunked_loss", chunked_loss),
                        ("variants", variants)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    if world_size % sp_size:
        raise ValueError(f"world_size={world_size} is not divisible by sp_size={sp_size} (ranks = DP x SP)")
    if seq_len % sp_size:
        raise ValueError(f"seq_len={seq_len} is not divisible by sp_size={sp_size} (rows are padded to a multiple)")
    if sp_size > 1 and engine not in ("zero3", "zero3_offload"):
        raise ValueError(f"sp_size={sp_size} runs on DeepSpeed ZeRO-3 only (engine zero3 or zero3_offload), "
                         f"got engine={engine!r}")
    if model.num_heads % sp_size:
        raise ValueError(f"num_heads={model.num_heads} is not divisible by sp_size={sp_size}")
    if device_memory_gib is not None and (isinstance(device_memory_gib, bool)
                                          or not isinstance(device_memory_gib, (int, float)) or device_memory_gib <= 0):
        raise ValueError(f"device_memory_gib must be a number > 0, got {device_memory_gib!r}")
    if not (isinstance(device_reserve_gib, (int, float)) and device_reserve_gib >= 0):
        raise ValueError(f"device_reserve_gib must be >= 0, got {device_reserve_gib!r}")
    if not (isinstance(fragmentation, (int, float)) and 0 <= fragmentation < 1):
        raise ValueError(f"fragmentation must be in [0, 1), got {fragmentation!r}")

    notes: list[str] = []
    comp, host, a, persistent_grads = _state(model, engine=engine, param_dtype=param_dtype, mixed_precision=mixed_precision,
                           world_size=world_size, zero3_max_live_parameters=zero3_max_live_parameters,
                           zero3_sub_group_size=zero3_sub_group_size, notes=notes)
    m = model
    h, I, d, nl, V = m.hidden_size, m.intermediate_size, m.head_dim, m.num_layers, m.vocab_size
    T = micro_batch * seq_len // sp_size  # tokens per rank outside attention
    Tfull = micro_batch * seq_len  # tokens per rank inside attention (after the all-to-all)
    Hl = m.num_heads // sp_size
    kvl = m.num_kv_heads // sp_size if m.num_kv_heads % sp_size == 0 else max(1, -(-m.num_kv_heads // sp_size))
    if m.num_kv_heads < sp_size:
        kvl = 1
        notes.append(f"ulysses: num_kv_heads={m.num_kv_heads} < sp_size={sp_size}: K/V heads replicated (1 per rank)")

    norm_b = 2 * (4 + a) * h  # per token, two RMSNorms
    mlp_b = 4 * a * I
    attn_tok = a * (2 * Hl * d + 2 * kvl * d) + 4 * Hl  # per attention token: q, o, k, v, lse
    layer_saved = T * (norm_b + mlp_b) + Tfull * attn_tok
    # one layer's backward working set: the flowing hidden-state gradient (in and out) + the MLP's gate/up gradients
    layer_grad = T * a * (2 * h + 2 * I)
    final_norm = T * (4 + a) * h
    if gradient_checkpointing:
        comp["activations (saved)"] = nl * T * a * h + final_norm
        comp["layer backward"] = layer_saved + layer_grad
        notes.append(f"activations: {nl} layer-input checkpoints + the final norm; layer backward: 1 layer recomputed "
                     f"+ its gradient working set; {T} tokens per rank ({micro_batch} x {seq_len} / sp {sp_size})")
    else:
        comp["activations (saved)"] = nl * layer_saved + final_norm
        comp["layer backward"] = layer_grad
        notes.append(f"activations: every layer's saved tensors ({nl} layers) + the final norm; layer backward: 1 "
                     f"layer's gradient working set; {T} tokens per rank ({micro_batch} x {seq_len} / sp {sp_size})")

    qkv = Tfull * (Hl + 2 * kvl) * d * a
    attn_saved = 0  # live from the forward to each layer's backward
    if attention == "varlen":
        gathered = 2 * micro_batch * (seq_len + num_documents) * kvl * d * a
        if gradient_checkpointing:
            attn_layer = gathered + qkv + gathered
        else:
            attn_saved, attn_layer = nl * gathered, qkv + gathered
        notes.append("attention (varlen): [anchor]+document K/V gathered per layer and kept for its backward"
                     f" ({'1 layer' if gradient_checkpointing else f'{nl} layers'}) + dq, dk, dv and the gathered "
                     "K/V gradients of one layer")
    elif attention == "reference":
        attn_layer = micro_batch * Hl * seq_len * seq_len * 4 * 2 + qkv
        notes.append("attention (reference): dense (L x L) scores and probabilities of one layer: the O(L^2) oracle")
    else:
        attn_layer = qkv
        notes.append(f"attention ({attention}): per-document, O(L) extra; dq, dk, dv of one layer")
    if sp_size > 1:
        attn_layer += Tfull * (2 * Hl + 2 * kvl) * d * a
        notes.append("ulysses: all-to-all buffers of q, k, v, o for one layer")
    comp["attention workspace"] = attn_saved + attn_layer

    if chunked_loss:
        ct = min(loss_chunk_tokens, T)
        if engine == "ddp":  # fused linear cross-entropy (anchorcontext.loss.chunked_linear_cross_entropy)
            fwd = ct * V * (12 if T > ct else 8) + T * h * a + 4 * V * h
            bwd = 2 * T * h * a + V * h * (8 + (a if a != 4 else 0))
            loss = max(fwd, bwd)
            notes.append(f"loss (chunked, fused): {ct} tokens x vocab {V} fp32 logits at a time "
                         f"({12 if T > ct else 8} bytes per element) + fp32 grad_W and grad_h held until its "
                         f"backward ({'forward' if fwd >= bwd else 'backward'} phase larger)")
        else:  # per-chunk checkpointed head (anchorcontext.loss.chunked_module_cross_entropy)
            loss = ct * V * 12 + 4 * V * h + 2 * T * h * a
            notes.append(f"loss (chunked, per-chunk checkpointed head under {engine}): {ct} tokens x vocab {V} at a "
                         "time (the recompute keeps no logits: fp32 log-softmax and 2 fp32 gradients), one chunk's "
                         "head-weight gradient, + the assembled hidden-state gradient")
        comp["loss (chunked)"] = loss
    else:
        loss = T * V * 12
        comp["loss (stock)"] = loss
        notes.append(f"loss (stock): {T} x {V} fp32 log-softmax + 2 fp32 grads (the logits leave with the model's "
                     "output before the backward, as in Trainer)")
    # The backward's phases. Loss: every layer's saved tensors, the final norm and the loss buffers are live, no
    # decoder gradient exists yet (but the persistent buffers). Then layer k (nl-1 down to 0): the loss is freed,
    # layers 0..k still hold their saved tensors S, layers k..nl-1 have their gradients G; linear in k, so the worst
    # layer is the first or the last one processed. The peak is the largest phase; the row below removes the rest.
    per_layer_saved = T * a * h if gradient_checkpointing else layer_saved + (gathered if attention == "varlen" else 0)
    np_grads = comp["gradients"] - persistent_grads
    g_layer = np_grads * m.layer_parameters // m.parameters
    g_other = np_grads - nl * g_layer  # embeddings / LM head / final norm: computed right after the loss
    work = comp["layer backward"] + attn_layer
    loss_phase = nl * per_layer_saved + final_norm + loss
    layer_phase = g_other + work + max(nl * per_layer_saved + g_layer, per_layer_saved + nl * g_layer)
    listed = nl * per_layer_saved + final_norm + work + loss + np_grads
    comp[OVERLAP] = max(loss_phase, layer_phase) - listed
    notes.append(f"{OVERLAP!r}: the loss's buffers are freed before the decoder layers' backward; each layer's saved "
                 "tensors are freed after its backward while its gradients (.grad, set to None between steps; not "
                 "DDP/ZeRO-3's persistent buffers) appear: only the largest phase counts "
                 f"({'loss' if loss_phase >= layer_phase else 'a decoder layer'}'s here)")
    if device_reserve_gib or fragmentation:
        comp["runtime reserve"] = int(device_reserve_gib * GIB + fragmentation * sum(comp.values()))
        notes.append(f"runtime reserve (assumed): {device_reserve_gib:g} GiB CUDA context/NCCL + "
                     f"{fragmentation:.0%} allocator fragmentation")

    inputs = dict(model=asdict(m), parameters=m.parameters, seq_len=seq_len, micro_batch=micro_batch,
                  world_size=world_size, sp_size=sp_size, engine=engine, param_dtype=param_dtype,
                  mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
                  attention=attention, chunked_loss=chunked_loss, loss_chunk_tokens=loss_chunk_tokens,
                  num_documents=num_documents)
    plan = MemoryPlan(components=comp, host=host,
                      device_memory=None if device_memory_gib is None else int(device_memory_gib * GIB),
                      device_name=device_name, notes=notes, inputs=inputs)
    if variants:
        kw = dict(model=m, seq_len=seq_len, micro_batch=micro_batch, world_size=world_size, sp_size=sp_size,
                  param_dtype=param_dtype, mixed_precision=mixed_precision, attention=attention,
                  loss_chunk_tokens=loss_chunk_tokens, num_documents=num_documents, device_reserve_gib=device_reserve_gib,
                  fragmentation=fragmentation, zero3_max_live_parameters=zero3_max_live_parameters,
                  zero3_sub_group_size=zero3_sub_group_size, variants=False)
        for e in ENGINES:
            if sp_size > 1 and e not in ("zero3", "zero3_offload"):
                continue
            for ck in (True, False):
                for ch in (False, True):
                    plan.variants[variant_key(e, ck, ch)] = plan_memory(engine=e, gradient_checkpointing=ck,
                                                                  chunked_loss=ch, **kw).total
    return plan


def variant_key(engine: str, gradient_checkpointing: bool, chunked_loss: bool) -> str:
    """The key of :attr:`MemoryPlan.variants`, e.g. ``"zero3, checkpointing, stock loss"``."""
    return (f"{engine}, {'checkpointing' if gradient_checkpointing else 'no checkpointing'}, "
            f"{'chunked' if chunked_loss else 'stock'} loss")


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a text table in GiB (2**30 bytes), with the verdict and the engine x checkpointing x loss totals."""
    i = plan.inputs
    where = plan.device_name or "device of unknown size"
    mem = f"{plan.device_memory / GIB:.1f} GiB" if plan.device_memory is not None else "unknown memory"
    loss = f"chunked ({i['loss_chunk_tokens']} tokens)" if i["chunked_loss"] else "stock"
    header = (f"memory plan per device: {i['world_size']} x {where}, {mem} each; {i['model'].get('name') or 'model'} "
              f"{i['parameters'] / 1e9:.2f}B params, L={i['seq_len']}, micro-batch {i['micro_batch']}, "
              f"sp_size {i['sp_size']}, engine {i['engine']}, weights {i['param_dtype']}, mixed precision "
              f"{i['mixed_precision']}, checkpointing {'on' if i['gradient_checkpointing'] else 'off'}, attention "
              f"{i['attention']}, loss {loss}")
    lines = [header,
             f"  {'component':<40} {'GiB':>8}"]
    for k, v in plan.components.items():
        lines.append(f"  {k:<40} {_gib(v)}")
    lines.append(f"  {'total (peak)':<40} {_gib(plan.total)}")
    for k, v in plan.host.items():
        lines.append(f"  host RAM per rank: {k:<17}{_gib(v)}")
    if plan.fits is None:
        lines.append("  fits: unknown (no device memory given: --device_memory_gib)")
    else:
        verdict = "fits" if plan.fits else "does not fit"
        lines.append(f"  {verdict}: {plan.total / GIB:.2f} of {plan.device_memory / GIB:.1f} GiB "
                     f"({plan.total / plan.device_memory:.0%})")
    if plan.variants:
        lines.append("  total GiB by engine x checkpointing x loss (same row, world size, sp_size):")
        lines.append(f"    {'engine':<14} {'ckpt+stock':>10} {'ckpt+chunk':>10} {'stock':>10} {'chunk':>10}")
        for e in ENGINES:
            row = [plan.variants.get(variant_key(e, ck, ch)) for ck in (True, False) for ch in (False, True)]
            if row[0] is None:
                continue
            cells = []
            for v in row:
                mark = "" if plan.device_memory is None else (" " if v <= plan.device_memory else "!")
                cells.append(f"{v / GIB:9.1f}{mark}")
            lines.append(f"    {e:<14} " + " ".join(f"{c:>10}" for c in cells))
        if plan.device_memory is not None:
            lines.append("    (! = does not fit)")
    lines.extend(f"  note: {n}" for n in plan.notes)
    return "\n".join(lines)


__all__ = ["ENGINES", "GIB", "KNOWN_MODELS", "OVERLAP", "MemoryPlan", "ModelDims", "format_plan", "plan_memory",
           "variant_key"]
