"""Offline RULER-style synthetic long-context tasks: prompts of an exact token length, and RULER's scoring.

Written for this project after the task definitions of RULER (Hsieh et al., 2024, arXiv 2404.06654,
``scripts/data/synthetic``) and the passkey test of Mohtashami & Jaggi (2023). Nothing is downloaded: the
"essay" haystack is the English prose of ``pydoc_data.topics`` (shipped with CPython) instead of Paul Graham's
essays, and the "noise" haystack is RULER's repeated sentences.

A prompt is a list of token ids, assembled from separately tokenized pieces so its length is *exact*::

    [bos?] instruction  context(haystack sentences + needles)  "\\n" question answer-prefix
    |<-------------------------------- length tokens ------------------------------------->|

The context is filled with whole haystack sentences and truncated at the last token; needles are inserted at
the sentence boundary nearest ``depth * filler_tokens`` (depth 0 = start of the context, 1 = end). Because
pieces are tokenized on their own, the ids can differ from ``tokenizer(decode(ids))`` at piece boundaries;
the model is fed the ids, and ``decode(ids)`` contains every needle verbatim.

Tasks (RULER's 13 minus the two QA tasks, which need SQuAD/HotpotQA, plus passkey):

============== ========= =========== ============ ===============================================
task           haystack  keys        values       needles
============== ========= =========== ============ ===============================================
niah_single_1  noise     words       numbers      1
niah_single_2  essay     words       numbers      1
niah_single_3  essay     words       uuids        1
niah_multikey_1 essay    words       numbers      1 queried + 3 distractor keys
niah_multikey_2 needle   words       numbers      1 queried; the haystack is all distractor needles
niah_multikey_3 needle   uuids       uuids        as multikey_2 with uuid keys
niah_multivalue essay    words       numbers      4 values for one key (all must be returned)
niah_multiquery essay    words       numbers      4 keys, all queried
vt             noise     ---         numbers      a chain of 5 variables (4 hops); return all names
cwe            ---       ---         ---          numbered word list; return the 10 most common words
fwe            ---       ---         ---          Zipf(2) coded words; return the 3 most frequent
passkey        noise     ---         5 digits     1
============== ========= =========== ============ ===============================================

Scoring follows RULER: ``string_match_all`` (fraction of references found as case-insensitive substrings of
the prediction; all tasks here) and ``string_match_part`` (1 if any reference is found; RULER's QA metric),
reported in percent.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_TASKS",
    "NIAH_TASKS",
    "TASKS",
    "RulerGenerator",
    "Sample",
    "TaskSpec",
    "parse_lengths",
    "parse_tasks",
    "score_prediction",
    "string_match_all",
    "string_match_part",
]

# ------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    """One RULER-style task. ``kind`` selects the generator; the NIAH fields mirror RULER's synthetic.yaml."""

    name: str
    kind: str  # "niah" | "vt" | "cwe" | "fwe" | "passkey"
    haystack: str = "noise"  # "noise" | "essay" | "needle"
    key_type: str = "words"  # "words" | "uuids"
    value_type: str = "numbers"  # "numbers" | "uuids"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    max_new_tokens: int = 128
    metric: str = "all"  # "all" | "part"


_SPECS = [
    TaskSpec("niah_single_1", "niah", haystack="noise"),
    TaskSpec("niah_single_2", "niah", haystack="essay"),
    TaskSpec("niah_single_3", "niah", haystack="essay", value_type="uuids"),
    TaskSpec("niah_multikey_1", "niah", haystack="essay", num_keys=4),
    TaskSpec("niah_multikey_2", "niah", haystack="needle"),
    TaskSpec("niah_multikey_3", "niah", haystack="needle", key_type="uuids", value_type="uuids"),
    TaskSpec("niah_multivalue", "niah", haystack="essay", num_values=4),
    TaskSpec("niah_multiquery", "niah", haystack="essay", num_keys=4, num_queries=4),
    TaskSpec("vt", "vt", haystack="noise", max_new_tokens=30),
    TaskSpec("cwe", "cwe", haystack="", max_new_tokens=120),
    TaskSpec("fwe", "fwe", haystack="", max_new_tokens=50),
    TaskSpec("passkey", "passkey", haystack="noise", max_new_tokens=16),
]
TASKS: dict[str, TaskSpec] = {s.name: s for s in _SPECS}
DEFAULT_TASKS: tuple[str, ...] = tuple(TASKS)
NIAH_TASKS: tuple[str, ...] = tuple(n for n, s in TASKS.items() if s.kind == "niah")
# Task groups accepted by parse_tasks.
_GROUPS = {"all": DEFAULT_TASKS, "niah": NIAH_TASKS, "ruler": DEFAULT_TASKS[:-1]}

_MAX_SENTENCE_TOKENS = 64
# RULER's noise haystack, one unit per sentence so needles land between sentences.
NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

_ADJECTIVES = (
    "able", "abrupt", "agile", "amber", "ancient", "bitter", "bold", "brave", "brisk", "calm", "cheerful",
    "clever", "cosmic", "crisp", "curious", "damp", "daring", "dusty", "eager", "early", "elegant", "fancy",
    "fierce", "fluffy", "fragile", "gentle", "giant", "glossy", "golden", "grumpy", "hasty", "hollow",
    "humble", "icy", "jolly", "keen", "lazy", "lively", "loud", "lucky", "mellow", "misty", "modern",
    "narrow", "noble", "odd", "pale", "polite", "proud", "quick", "quiet", "rapid", "rusty", "shiny",
    "silent", "silly", "sleepy", "smooth", "spicy", "steady", "sturdy", "sunny", "swift", "tender",
    "tidy", "tiny", "vivid", "wary", "wild", "witty", "young", "zesty",
)  # fmt: skip
_NOUNS = (
    "anchor", "apple", "badger", "banjo", "barrel", "beacon", "beetle", "bison", "bridge", "candle",
    "canyon", "castle", "cedar", "comet", "copper", "cricket", "dagger", "desert", "dolphin", "dragon",
    "falcon", "fern", "forest", "fossil", "garden", "glacier", "harbor", "hammer", "heron", "island",
    "jackal", "kettle", "lantern", "lemon", "lizard", "magnet", "maple", "meadow", "mirror", "monkey",
    "needle", "otter", "panther", "pepper", "pillow", "pirate", "planet", "puffin", "quartz", "rabbit",
    "raven", "ribbon", "river", "rocket", "saddle", "salmon", "spider", "squirrel", "temple", "thistle",
    "tiger", "tulip", "turtle", "valley", "violin", "walnut", "walrus", "willow", "wizard", "zebra",
)  # fmt: skip

_NIAH_TEMPLATE = (
    "Some special magic {vtype} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {vtype} afterwards.\n"
)
_NIAH_QUESTION = "\nWhat are all the special magic {vtype} for {query} mentioned in the provided text?"
_NIAH_ANSWER = " The special magic {vtype} for {query} mentioned in the provided text are"
_NIAH_NEEDLE = " One of the special magic {vtype} for {key} is: {value}."
_VT_TEMPLATE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
_VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
_VT_ANSWER = (
    " Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
    "assigned the value {value}, they are:"
)
_CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
_CWE_QUESTION = "\nQuestion: What are the {n} most common words in the above list?"
_CWE_ANSWER = " Answer: The top {n} words that appear most often in the list are:"
_FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words.\n"
)
_FWE_QUESTION = "\nQuestion: What are the three most frequently appeared words in the above coded text?"
_FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"
_PASSKEY_TEMPLATE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
_PASSKEY_QUESTION = "\nWhat is the pass key?"
_PASSKEY_ANSWER = " The pass key is"
_PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."


def parse_tasks(tasks: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"niah_single_1,vt"`` / a list / ``"all"`` / ``"niah"`` → validated task names (order kept, no duplicates)."""
    if tasks is None:
        return list(DEFAULT_TASKS)
    items = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    out: list[str] = []
    for t in items:
        if not t:
            continue
        names = _GROUPS.get(t, (t,))
        for n in names:
            if n not in TASKS:
                raise ValueError(f"unknown task {t!r}; choose from {sorted(TASKS)} or a group {sorted(_GROUPS)}")
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError(f"tasks must name at least one task, got {tasks!r}")
    return out


_LEN_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_lengths(lengths: str | int | list | tuple) -> list[int]:
    """``"512,1k,2K,1.5k"`` or ``[512, "4k"]`` → ``[512, 1024, 2048, 1536]`` (k = 1024, m = 1024²)."""
    items = lengths.split(",") if isinstance(lengths, str) else ([lengths] if isinstance(lengths, int) else lengths)
    out = []
    for item in items:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            value = int(item)
        else:
            m = _LEN_RE.match(str(item))
            if not m:
                raise ValueError(f"lengths: cannot parse {item!r} (use e.g. 512, 1k, 4K, 1.5k)")
            scale = {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]
            value = float(m.group(1)) * scale
            if value != int(value):
                raise ValueError(f"lengths: {item!r} is not a whole number of tokens")
            value = int(value)
        if value < 1:
            raise ValueError(f"lengths: every length must be positive, got {item!r}")
        out.append(value)
    if not out:
        raise ValueError(f"lengths must contain at least one length, got {lengths!r}")
    return out


# ----------------------------------------------------------------------------------------- scoring


def _clean(text: str) -> str:
    # RULER's postprocess_pred: drop control characters, then strip.
    return re.sub(r"[\x00-\x1f]", "\n", text).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER ``string_match_all`` for one sample: fraction of references that occur (case-insensitively) in it."""
    if not references:
        raise ValueError("references must not be empty")
    pred = _clean(prediction).lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """RULER ``string_match_part`` for one sample: 1.0 if any reference occurs (case-insensitively), else 0.0."""
    if not references:
        raise ValueError("references must not be empty")
    pred = _clean(prediction).lower()
    return float(any(r.lower() in pred for r in references))


def score_prediction(task: str, prediction: str, references: list[str]) -> float:
    """Score in [0, 1] with the task's RULER metric (multiply by 100 for RULER's percent)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    fn = string_match_all if TASKS[task].metric == "all" else string_match_part
    return fn(prediction, references)


# ----------------------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """One prompt. ``input_ids`` has exactly ``length`` tokens; ``references`` are the expected answer strings.

    ``needle_spans``: ``[(start, end), ...]`` token offsets in ``input_ids`` of each inserted needle (for
    NIAH: the queried needles first, in query order; passkey: the key sentence; vt: the chain statements);
    ``depth``: the requested depth of the (first) queried needle, ``None`` for tasks without one;
    ``context_span``: ``(start, end)`` of the haystack/context (between the instruction and the question).
    """

    task: str
    length: int
    index: int
    input_ids: list[int]
    references: list[str]
    depth: float | None = None
    needle_spans: list[tuple[int, int]] = field(default_factory=list)
    query: str = ""
    context_span: tuple[int, int] = (0, 0)
    meta: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict:
        """A JSON-serialisable summary (without the prompt ids)."""
        return {
            "task": self.task,
            "length": self.length,
            "index": self.index,
            "prompt_tokens": len(self.input_ids),
            "depth": self.depth,
            "needle_spans": [list(s) for s in self.needle_spans],
            "context_span": list(self.context_span),
            "references": list(self.references),
            **self.meta,
        }


def _count_subsequence(ids: list[int], sub: list[int]) -> int:
    if not sub or len(sub) > len(ids):
        return 0
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(ids, dtype=np.int64), len(sub))
    return int((windows == np.asarray(sub, dtype=np.int64)).all(axis=1).sum())


class RulerGenerator:
    """Builds RULER-style prompts of an exact token length for one tokenizer.

    ``bos``: ``"auto"`` prepends ``tokenizer.bos_token_id`` iff the tokenizer itself adds it when encoding,
    ``"always"`` prepends it (the anchor of an AnchorAttention fine-tune), ``"never"`` does not.
    ``seed``: every sample draws from ``random.Random(f"{seed}:{task}:{length}:{index}")``, so a sample never
    depends on which other tasks, lengths or samples are generated with it.
    """

    def __init__(self, tokenizer: Any, *, seed: int = 0, bos: str = "auto") -> None:
        if bos not in ("auto", "always", "never"):
            raise ValueError(f"bos must be 'auto', 'always' or 'never', got {bos!r}")
        self.tokenizer = tokenizer
        self.seed = int(seed)
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos == "always" and bos_id is None:
            raise ValueError("bos='always' but the tokenizer has no bos_token_id")
        if bos == "auto":
            probe = tokenizer("a")["input_ids"]
            use = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
        else:
            use = bos == "always"
        self.prefix_ids: list[int] = [bos_id] if use else []
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ tokenization helpers

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _essay_units(self) -> list[list[int]]:
        """English sentences of ``pydoc_data.topics`` (sorted by topic), each tokenized with a leading space.

        ~3,000 sentences, ~70K tokens (BPE or SmolLM2): longer contexts wrap around to the first topic."""
        if "essay" not in self._cache:
            from pydoc_data.topics import topics

            sentences: list[str] = []
            for key in sorted(topics):
                for para in re.split(r"\n\s*\n", topics[key]):
                    para = " ".join(para.split())
                    # Prose only: skip code listings and reST tables (few letters or no final punctuation).
                    if len(para) < 40 or not para[-1] in ".:;)" or sum(c.isalpha() for c in para) < 0.7 * len(para):
                        continue
                    sentences += [s for s in re.split(r"(?<=[.!?])\s+", para) if s]
            # Sentences of at most 64 tokens (99% of them) keep needle depths precise to one short sentence.
            units = self._encode_batch([" " + s for s in sentences])
            self._cache["essay"] = [u for u in units if len(u) <= _MAX_SENTENCE_TOKENS]
        return self._cache["essay"]

    def _noise_units(self) -> list[list[int]]:
        if "noise" not in self._cache:
            self._cache["noise"] = self._encode_batch([" " + s for s in NOISE_SENTENCES])
        return self._cache["noise"]

    def _word_pool(self) -> list[str]:
        """Distinct lowercase English words (3-10 letters) from the pydoc topics, sorted: the cwe vocabulary."""
        if "words" not in self._cache:
            from pydoc_data.topics import topics

            words = set()
            for text in topics.values():
                words.update(w for w in re.findall(r"\b[a-z]{3,10}\b", text))
            self._cache["words"] = sorted(words)
        return self._cache["words"]

    # ------------------------------------------------------------------ context assembly

    @staticmethod
    def _fill(units, budget: int, inserts: list[tuple[float, list[int]]]) -> tuple[list[int], list[tuple[int, int]]]:
        """Context of exactly ``budget`` tokens: filler units, cut at the end, plus ``inserts`` at depths.

        ``units``: an iterator of token lists (sentences). ``inserts``: ``[(depth, ids), ...]``; each goes to
        the sentence boundary nearest ``depth * filler_len``; equal positions keep the given order.
        Returns the context and each insert's ``(start, end)`` offset within it, in input order.
        """
        need = sum(len(ids) for _, ids in inserts)
        filler_len = budget - need
        if filler_len < 0:
            raise ValueError(f"needles need {need} tokens but only {budget} remain")
        filler: list[int] = []
        bounds = [0]
        for unit in units:
            if len(filler) >= filler_len:
                break
            filler.extend(unit)
            bounds.append(len(filler))
        del filler[filler_len:]
        bounds = sorted({b for b in bounds if b < filler_len} | {filler_len})
        bounds_arr = np.asarray(bounds)
        placed = []
        for order, (depth, ids) in enumerate(inserts):
            pos = int(bounds_arr[np.argmin(np.abs(bounds_arr - depth * filler_len))])
            placed.append((pos, order, ids))
        placed.sort(key=lambda p: (p[0], p[1]))
        out: list[int] = []
        spans: list[tuple[int, int]] = [(0, 0)] * len(inserts)
        cursor = 0
        for pos, order, ids in placed:
            out.extend(filler[cursor:pos])
            cursor = pos
            spans[order] = (len(out), len(out) + len(ids))
            out.extend(ids)
        out.extend(filler[cursor:])
        return out, spans

    def _cycle(self, units: list[list[int]], start: int):
        n = len(units)
        i = start
        while True:
            yield units[i % n]
            i += 1

    def _assemble(
        self, task: str, length: int, head: str, tail: str, make_context
    ) -> tuple[list[int], list[tuple[int, int]], Any, tuple[int, int]]:
        head_ids = self.prefix_ids + self._encode(head)
        tail_ids = self._encode(tail)
        budget = length - len(head_ids) - len(tail_ids)
        try:
            if budget < 0:
                raise ValueError(f"the instruction and question alone take {len(head_ids) + len(tail_ids)} tokens")
            context, spans, extra = make_context(budget)
        except ValueError as exc:
            raise ValueError(
                f"length {length} is too small for task {task!r} with this tokenizer: {exc} "
                f"(template: {len(head_ids) + len(tail_ids)} tokens)"
            ) from None
        off = len(head_ids)
        ids = head_ids + context + tail_ids
        assert len(ids) == length, (len(ids), length)
        return ids, [(a + off, b + off) for a, b in spans], extra, (off, off + len(context))

    # ------------------------------------------------------------------ tasks

    def _rng(self, task: str, length: int, index: int, attempt: int = 0) -> random.Random:
        return random.Random(f"{self.seed}:{task}:{length}:{index}:{attempt}")

    @staticmethod
    def _word_key(rng: random.Random) -> str:
        return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"

    @staticmethod
    def _value(rng: random.Random, kind: str) -> str:
        if kind == "numbers":
            return str(rng.randint(1_000_000, 9_999_999))
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def _niah(self, spec: TaskSpec, length: int, index: int, depth: float) -> Sample:
        for attempt in range(20):
            rng = self._rng(spec.name, length, index, attempt)
            keys: list[str] = []
            while len(keys) < spec.num_keys:
                k = self._word_key(rng) if spec.key_type == "words" else self._value(rng, "uuids")
                if k not in keys:
                    keys.append(k)
            values = [[self._value(rng, spec.value_type) for _ in range(spec.num_values)] for _ in keys]
            queried = list(range(spec.num_queries))  # keys[0..q-1] are queried; the rest are distractors
            vtype = spec.value_type
            needles: list[tuple[float, list[int], str]] = []
            for ki, key in enumerate(keys):
                for vi, value in enumerate(values[ki]):
                    d = depth if (ki == 0 and vi == 0) else rng.random()
                    text = _NIAH_NEEDLE.format(vtype=vtype, key=key, value=value)
                    needles.append((d, self._encode(text), text))
            query_keys = [keys[i] for i in queried]
            query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
            refs = [v for i in queried for v in values[i]]

            def make_context(budget: int, rng=rng, keys=keys, needles=needles) -> tuple:
                if spec.haystack == "noise":
                    units = self._cycle(self._noise_units(), 0)
                elif spec.haystack == "essay":
                    essay = self._essay_units()
                    units = self._cycle(essay, rng.randrange(len(essay)))
                else:  # a haystack of distractor needles with fresh keys
                    units = self._distractor_needles(rng, spec, set(keys))
                ctx, spans = self._fill(units, budget, [(d, ids) for d, ids, _ in needles])
                return ctx, spans, None

            head = _NIAH_TEMPLATE.format(vtype=vtype)
            tail = _NIAH_QUESTION.format(vtype=vtype, query=query) + _NIAH_ANSWER.format(vtype=vtype, query=query)
            ids, spans, _, ctx_span = self._assemble(spec.name, length, head, tail, make_context)
            # Every needle must occur exactly once (a value could, in principle, recur in the essay).
            if all(_count_subsequence(ids, n_ids) == 1 for _, n_ids, _ in needles):
                n_queried = sum(len(values[i]) for i in queried)
                return Sample(
                    spec.name, length, index, ids, refs, depth=depth, needle_spans=spans[:n_queried], query=query,
                    context_span=ctx_span, meta={"num_needles": len(needles), "haystack": spec.haystack},
                )  # fmt: skip
        raise RuntimeError(f"could not place unique needles for {spec.name} at length {length}")  # pragma: no cover

    def _distractor_needles(self, rng: random.Random, spec: TaskSpec, taken: set[str]):
        while True:
            key = self._word_key(rng) if spec.key_type == "words" else self._value(rng, "uuids")
            if key in taken:
                continue
            yield self._encode(
                _NIAH_NEEDLE.format(vtype=spec.value_type, key=key, value=self._value(rng, spec.value_type))
            )

    def _vt(self, spec: TaskSpec, length: int, index: int, depth: float | None) -> Sample:
        rng = self._rng(spec.name, length, index)
        names: list[str] = []
        while len(names) < 5:  # RULER: one chain, four hops
            n = "".join(rng.choices(string.ascii_uppercase, k=5))
            if n not in names:
                names.append(n)
        value = str(rng.randint(10_000, 99_999))
        stmts = [f" VAR {names[0]} = {value}."] + [f" VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
        depths = sorted(rng.random() for _ in stmts)

        def make_context(budget: int) -> tuple:
            inserts = [(d, self._encode(s)) for d, s in zip(depths, stmts)]
            ctx, spans = self._fill(self._cycle(self._noise_units(), 0), budget, inserts)
            return ctx, spans, None

        tail = _VT_QUESTION.format(value=value) + _VT_ANSWER.format(n=len(names), value=value)
        ids, spans, _, ctx_span = self._assemble(spec.name, length, _VT_TEMPLATE, tail, make_context)
        return Sample(spec.name, length, index, ids, names, needle_spans=spans, query=value, context_span=ctx_span)

    def _cwe(self, spec: TaskSpec, length: int, index: int, depth: float | None) -> Sample:
        rng = self._rng(spec.name, length, index)
        num_cw = 10
        pool = self._word_pool()
        head = _CWE_TEMPLATE
        tail = _CWE_QUESTION.format(n=num_cw) + _CWE_ANSWER.format(n=num_cw)

        def make_context(budget: int) -> tuple:
            words = rng.sample(pool, len(pool))
            # ~tokens per numbered item with this tokenizer, measured on a few items.
            per_item = max(
                1.0,
                np.mean([len(t) for t in self._encode_batch([f"\n{i + 1}. {w}" for i, w in enumerate(words[:64])])]),
            )
            items_fit = int(budget / per_item)
            # RULER uses 30 / 3 occurrences at 4K+; scale down so short contexts still separate the classes.
            freq_ucw = 3 if items_fit >= 600 else (2 if items_fit >= 300 else 1)
            freq_cw = min(30, max(freq_ucw + 2, items_fit // (4 * num_cw)))
            if num_cw * freq_cw + 2 > items_fit:
                raise ValueError(
                    f"the {num_cw} common words x {freq_cw} need ~{int(num_cw * freq_cw * per_item)} tokens"
                )
            common = words[:num_cw]
            n_uncommon = max(0, (items_fit - num_cw * freq_cw) // freq_ucw)
            uncommon = words[num_cw : num_cw + n_uncommon]
            seq = [w for w in common for _ in range(freq_cw)] + [w for w in uncommon for _ in range(freq_ucw)]
            rng.shuffle(seq)
            extra = iter(words[num_cw + n_uncommon :] + [f"{a}{b}" for a in _ADJECTIVES for b in _NOUNS])
            while True:
                toks = self._encode_batch([f"\n{i + 1}. {w}" for i, w in enumerate(seq)])
                total = sum(map(len, toks))
                if total <= budget:
                    break
                # Over budget: drop uncommon occurrences from the end (common words keep all theirs).
                n_drop = max(1, int(np.ceil((total - budget) / per_item)))
                keep_from_end = [i for i in range(len(seq) - 1, -1, -1) if seq[i] not in common][:n_drop]
                if not keep_from_end:
                    raise ValueError(f"the {num_cw} common words x {freq_cw} do not fit in {budget} tokens")
                for i in sorted(keep_from_end, reverse=True):
                    del seq[i]
            ctx = [t for item in toks for t in item]
            i = len(seq)
            while len(ctx) < budget:  # top up with singletons, the last one cut at the budget
                ctx.extend(self._encode(f"\n{i + 1}. {next(extra)}"))
                i += 1
            del ctx[budget:]
            return ctx, [], {"freq_common": freq_cw, "freq_uncommon": freq_ucw}

        ids, _, meta, ctx_span = self._assemble(spec.name, length, head, tail, make_context)
        refs = self._top_words(ids, ctx_span, num_cw)
        return Sample(spec.name, length, index, ids, refs, context_span=ctx_span, meta=meta)

    def _top_words(self, ids: list[int], ctx_span: tuple[int, int], k: int) -> list[str]:
        """The k most frequent words of the context as decoded from the prompt (what the model actually sees)."""
        text = self.tokenizer.decode(ids[ctx_span[0] : ctx_span[1]], skip_special_tokens=True)
        words = re.findall(r"[A-Za-z]+", text)
        counts = Counter(words).most_common()
        if len(counts) <= k or counts[k - 1][1] <= counts[k][1]:
            raise ValueError(f"the top {k} words are not separated from the rest: {counts[: k + 1]}")
        return [w for w, _ in counts[:k]]

    def _fwe(self, spec: TaskSpec, length: int, index: int, depth: float | None) -> Sample:
        head, tail = _FWE_TEMPLATE, _FWE_QUESTION + _FWE_ANSWER
        last_error = None
        for attempt in range(20):
            rng = self._rng(spec.name, length, index, attempt)
            vocab: list[str] = []
            seen = set()
            while len(vocab) < 1000:
                w = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 7)))
                if w not in seen:
                    seen.add(w)
                    vocab.append(w)
            weights = np.cumsum([1.0 / (r**2.0) for r in range(1, len(vocab) + 1)])  # Zipf, alpha = 2

            def make_context(budget: int, rng=rng, vocab=vocab, weights=weights) -> tuple:
                ctx: list[int] = []
                while len(ctx) < budget:
                    batch = rng.choices(vocab, cum_weights=weights, k=256)
                    for toks in self._encode_batch([" " + w for w in batch]):
                        ctx.extend(toks)
                del ctx[budget:]
                return ctx, [], None

            ids, _, _, ctx_span = self._assemble(spec.name, length, head, tail, make_context)
            try:
                refs = self._top_words(ids, ctx_span, 3)
            except ValueError as exc:  # ties at this length and seed: draw again
                last_error = exc
                continue
            return Sample(spec.name, length, index, ids, refs, context_span=ctx_span, meta={"attempt": attempt})
        raise ValueError(f"length {length} is too small for task 'fwe': {last_error}")

    def _passkey(self, spec: TaskSpec, length: int, index: int, depth: float) -> Sample:
        rng = self._rng(spec.name, length, index)
        key = str(rng.randint(10_000, 99_999))

        def make_context(budget: int) -> tuple:
            needle = self._encode(_PASSKEY_NEEDLE.format(key=key))
            ctx, spans = self._fill(self._cycle(self._noise_units(), 0), budget, [(depth, needle)])
            return ctx, spans, None

        tail = _PASSKEY_QUESTION + _PASSKEY_ANSWER
        ids, spans, _, ctx_span = self._assemble(spec.name, length, _PASSKEY_TEMPLATE, tail, make_context)
        return Sample(spec.name, length, index, ids, [key], depth=depth, needle_spans=spans, context_span=ctx_span)

    # ------------------------------------------------------------------ public API

    def sample(self, task: str, length: int, index: int = 0, depth: float | None = None) -> Sample:
        """One prompt of exactly ``length`` tokens. ``depth`` in [0, 1] places the queried needle (NIAH/passkey);
        ``None`` draws it from the sample's RNG."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if depth is not None and not 0.0 <= float(depth) <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth!r}")
        spec = TASKS[task]
        if depth is None and spec.kind in ("niah", "passkey"):
            depth = round(self._rng(task, length, index, -1).random(), 4)
        return getattr(self, f"_{spec.kind}")(spec, length, index, None if depth is None else float(depth))

    def generate(
        self,
        tasks: str | list[str] | None = None,
        lengths: str | list = (512, 1024, 2048),
        samples: int = 4,
        depths: list[float] | None = None,
    ) -> list[Sample]:
        """``samples`` prompts for every task × length, in task-major order.

        Depths (NIAH and passkey): sample ``i`` uses ``depths[i % len(depths)]``; by default evenly spaced
        ``i / (samples - 1)`` from 0 to 1 (0.5 for a single sample), so a depth × length grid comes for free.
        """
        names = parse_tasks(tasks)
        lens = parse_lengths(lengths)
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int, got {samples!r}")
        if depths is None:
            depths = [i / (samples - 1) for i in range(samples)] if samples > 1 else [0.5]
        for d in depths:
            if not 0.0 <= float(d) <= 1.0:
                raise ValueError(f"depths must lie in [0, 1], got {d!r}")
        out = []
        for task in names:
            for length in lens:
                for i in range(samples):
                    d = depths[i % len(depths)] if TASKS[task].kind in ("niah", "passkey") else None
                    out.append(self.sample(task, length, i, d))
        return out
