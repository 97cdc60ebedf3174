"""``resolve_backend``'s cache (``attention/dispatch.py``): every answer equals the uncached registry walk, a change
of the kernels found (a backend's ``state()``) or of the inputs is honoured, and the reasons are still logged once.

No CUDA needed: only the decision is exercised (the varlen kernels are faked by their signatures).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import flash_standin
import pytest
import torch

from anchorcontext.attention import dispatch, resolve_backend, varlen


def torch_varlen_with_window(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                             window_size=(-1, -1), enable_gqa=False):  # torch 2.12+'s signature; never called here
    raise AssertionError("only the signature is read")


def torch_varlen_without_window(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False):  # 2.10
    raise AssertionError("only the signature is read")


NO_FLASH = (None, "flash-attn not importable (test)")
NO_TORCH = (None, "torch varlen_attn unavailable (test)")
# (varlen._KERNEL_OVERRIDE, flash_varlen_kernel(), torch_varlen_func()): the runtime state varlen's availability reads
KERNEL_STATES = {
    "no_kernel": (None, NO_FLASH, NO_TORCH),
    "torch_window": (None, NO_FLASH, (torch_varlen_with_window, "torch")),
    "torch_no_window": (None, NO_FLASH, (torch_varlen_without_window, "torch")),
    "flash_attn": (None, (flash_standin.flash_attn_varlen_func, "flash_attn"), NO_TORCH),
    "override": (flash_standin.flash_attn_varlen_func, NO_FLASH, NO_TORCH),  # the CPU stand-in: varlen runs anywhere
}
DEVICES = (torch.device("cpu"), torch.device("cuda"))
DTYPES = (None, torch.float32, torch.bfloat16)
OPTIONS = (
    {},
    dict(softcap=30.0),
    dict(dropout=0.1),
    dict(sliding_window=4),
    dict(needs_grad=False),
    dict(head_dim=8),
    dict(softcap=30.0, sliding_window=4, head_dim=64),
)
DEFAULTS = dict(softcap=None, dropout=0.0, needs_grad=True, sliding_window=None, head_dim=None)


def install(monkeypatch, state: str) -> None:
    override, flash, torch_fn = KERNEL_STATES[state]
    monkeypatch.setattr(varlen, "_KERNEL_OVERRIDE", override)
    monkeypatch.setattr(varlen, "flash_varlen_kernel", lambda: flash if override is None else (override, "override"))
    monkeypatch.setattr(varlen, "torch_varlen_func", lambda: torch_fn)


@pytest.fixture
def empty_cache(monkeypatch):
    monkeypatch.setattr(dispatch, "_resolved", {})
    monkeypatch.setattr(dispatch, "_logged", set())


@pytest.fixture
def walks(monkeypatch):
    """Counts calls of every backend's ``unavailable_reason`` (registry walks) from here on."""
    count = [0]

    def counting(b):
        def reason(*args):
            count[0] += 1
            return b.unavailable_reason(*args)

        return dataclasses.replace(b, unavailable_reason=reason)

    monkeypatch.setattr(dispatch, "REGISTRY", tuple(counting(b) for b in dispatch.REGISTRY))
    return count


def test_cached_answer_equals_the_uncached_walk(empty_cache, walks, monkeypatch):
    """Every (kernel state, device, dtype, options) key, visited with the kernel states in order and then in reverse
    (so the later visits find entries cached under the other states): the answer is the walk's, the first visit of
    a key walks the registry and a repeated call does not."""
    answers = {}
    for state in [*KERNEL_STATES, *reversed(KERNEL_STATES)]:
        install(monkeypatch, state)
        for device, dtype, opts in itertools.product(DEVICES, DTYPES, OPTIONS):
            full = {**DEFAULTS, **opts}
            expected, _ = dispatch._walk(device, dtype, dict(full))
            before = walks[0]
            got = resolve_backend("auto", device, dtype=dtype, **opts)
            first_visit = (state, device, dtype, tuple(sorted(opts.items()))) not in answers
            assert (walks[0] > before) == first_visit  # a miss walks the registry, a hit does not
            after = walks[0]
            assert resolve_backend("auto", device, dtype=dtype, **opts) == got == expected, (state, device, dtype, opts)
            assert walks[0] == after  # a hit walks nothing
            answers[(state, device, dtype, tuple(sorted(opts.items())))] = got
    # the grid exercises every backend as an answer, and the kernel state decides some keys
    assert set(answers.values()) == {"varlen", "flex", "sdpa", "reference"}
    by_key = {}
    for (state, *key), name in answers.items():
        by_key.setdefault(tuple(key), set()).add(name)
    assert any(len(names) > 1 for names in by_key.values())


def test_a_kernel_found_or_swapped_after_caching_is_honoured(empty_cache, monkeypatch):
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    install(monkeypatch, "torch_window")
    assert resolve_backend("auto", cuda, dtype=bf16, sliding_window=4) == "varlen"
    install(monkeypatch, "torch_no_window")  # an older torch varlen_attn: no window_size
    assert resolve_backend("auto", cuda, dtype=bf16, sliding_window=4) == "flex"
    install(monkeypatch, "flash_attn")
    assert resolve_backend("auto", cuda, dtype=bf16, sliding_window=4, softcap=30.0) == "varlen"
    # inputs: the same state, other keys
    assert resolve_backend("auto", cuda, dtype=torch.float32, sliding_window=4) == "flex"  # half dtypes only
    assert resolve_backend("auto", cuda, dtype=bf16, dropout=0.1) == "varlen"  # flash-attn has dropout
    assert resolve_backend("auto", cuda, dtype=torch.float32, dropout=0.1) == "sdpa"
    assert resolve_backend("auto", cuda, dtype=torch.float32, head_dim=8) == "sdpa"  # flex needs head_dim >= 16
    cpu = torch.device("cpu")
    install(monkeypatch, "override")
    assert resolve_backend("auto", cpu) == "varlen"
    install(monkeypatch, "no_kernel")
    assert resolve_backend("auto", cpu) == "sdpa"
    assert resolve_backend("auto", cpu, softcap=5.0) == "reference"
    assert resolve_backend("sdpa", cpu, softcap=5.0) == "sdpa"  # a named backend is never resolved


def test_reasons_are_logged_once_with_a_warm_cache(empty_cache, monkeypatch, caplog):
    install(monkeypatch, "no_kernel")
    cpu = torch.device("cpu")
    resolve_backend("auto", cpu)  # cached (and logged) before the log is reset
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger="anchorcontext"):
        for _ in range(3):
            assert resolve_backend("auto", cpu) == "sdpa"
    msgs = [r.getMessage() for r in caplog.records if r.name == "anchorcontext"]
    assert sum("varlen backend off" in m for m in msgs) == 1, msgs
    assert sum("flex is off on CPU" in m for m in msgs) == 1, msgs


def test_the_cache_is_bounded_and_unhashable_options_are_walked(empty_cache, monkeypatch):
    install(monkeypatch, "no_kernel")
    monkeypatch.setattr(dispatch, "_RESOLVED_MAX", 4)
    cpu = torch.device("cpu")
    for i in range(10):
        assert resolve_backend("auto", cpu, dropout=0.01 * (i + 1)) == "sdpa"
        assert len(dispatch._resolved) <= 4
    dispatch._resolved.clear()
    assert resolve_backend("auto", cpu, softcap=[30.0]) == "reference"  # not hashable: walked, not cached
    assert not dispatch._resolved
