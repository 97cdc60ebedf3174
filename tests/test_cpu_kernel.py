"""The compiled CPU kernel of the sdpa backend (``anchorcontext/attention/csrc``) against the float64 oracle.

``test_backends.py`` runs ``sdpa`` (this kernel, for fp32/fp64) and ``sdpa_stock`` (the fallback) over every
layout case at L=61, where one query block and one key block cover each segment. Here the block sizes are
shrunk so that the same small layouts cross many query and key blocks (diagonal blocks, rows that see none of
a block's keys, ragged tails), and one long row runs the default blocks over documents longer than them.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time

import pytest
import torch

from anchorcontext import AnchorLayout
from anchorcontext.attention import cpu_kernel, reference_attention, sdpa_attention
from anchorcontext.attention import sdpa as sdpa_module

HAVE_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None
needs_kernel = pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler: the kernel cannot be built here")


def row(lengths, length):
    ids = [0]
    for d, n in enumerate(lengths, start=1):
        ids += [d] * n
    return ids + [-1] * (length - len(ids))


def qkv_blhd(B, L, H, Hkv, D, dtype, seed=0):
    """Q/K/V in (B, L, H, D) memory viewed as (B, H, L, D), as a transformers attention module passes them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    k = torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    v = torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    return q, k, v


def grads(fn, q, k, v, layout, dout, **kw):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, layout, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@pytest.fixture
def kernel_used(monkeypatch):
    """Counts calls of the compiled kernel's autograd Function (so a test knows the fast path really ran)."""
    calls = []
    real = sdpa_module._AnchorKernelCPU.apply

    def spy(*args):
        calls.append(args[3].shape[0])
        return real(*args)

    monkeypatch.setattr(sdpa_module._AnchorKernelCPU, "apply", spy)
    return calls


LAYOUTS = {
    "mixed_batch": (61, [[7, 13, 5, 21, 9], [30, 1, 1, 12]]),  # second row padded
    "one_token_docs": (40, [[1, 1, 3, 1, 1, 2, 1, 17, 1, 1, 5], [39]]),
    "single_doc": (45, [[44]]),
}


@needs_kernel
@pytest.mark.parametrize("blocks", [(3, 5), (4, 8), (64, 16), (2, 1)], ids=lambda b: f"q{b[0]}k{b[1]}")
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mode", ["anchor", "intra_doc"])
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_kernel_blocks_match_reference(case, mode, heads, blocks, monkeypatch, kernel_used):
    monkeypatch.setattr(cpu_kernel, "Q_BLOCK", blocks[0])
    monkeypatch.setattr(cpu_kernel, "KV_BLOCK", blocks[1])
    L, lengths = LAYOUTS[case]
    layout = AnchorLayout.from_doc_ids(torch.tensor([row(x, L) for x in lengths]), mode)
    q, k, v = qkv_blhd(layout.batch_size, L, *heads, 8, torch.float64)
    dout = torch.randn(layout.batch_size, L, heads[0], 8, dtype=torch.float64)
    got = grads(sdpa_attention, q, k, v, layout, dout, scaling=0.4)
    want = grads(reference_attention, q, k, v, layout, dout, scaling=0.4)
    assert kernel_used == [layout.num_segments]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_kernel_long_documents_default_blocks(dtype, kernel_used):
    """Documents longer than the default blocks (128 queries, 512 keys): 700 and 530 tokens, plus short ones,
    so every block kind of the default configuration runs; fp32 within a few ulps of the fp64 oracle."""
    L = 1400
    layout = AnchorLayout.from_doc_ids(torch.tensor([row([700, 3, 530, 1, 150], L)]))
    q, k, v = qkv_blhd(1, L, 4, 2, 16, dtype, seed=1)
    dout = torch.randn(1, L, 4, 16, dtype=torch.float64).to(dtype)
    got = grads(sdpa_attention, q, k, v, layout, dout)
    want = grads(reference_attention, *(t.double() for t in (q, k, v)), layout, dout.double())
    assert kernel_used == [layout.num_segments]
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=name)


@needs_kernel
def test_kernel_and_stock_path_agree_in_fp32(kernel_used):
    layout = AnchorLayout.from_doc_ids(torch.tensor([row([100, 1, 37, 250], 400)]))
    q, k, v = qkv_blhd(1, 400, 4, 4, 32, torch.float32, seed=2)
    dout = torch.randn(1, 400, 4, 32)
    fast = grads(sdpa_attention, q, k, v, layout, dout)
    with cpu_kernel.disabled():
        stock = grads(sdpa_attention, q, k, v, layout, dout)
    assert kernel_used == [layout.num_segments]  # once, for the first call only
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, stock):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_env_off_uses_the_stock_path(monkeypatch, kernel_used):
    layout = AnchorLayout.from_doc_ids(torch.tensor([row([5, 9], 16)]))
    q, k, v = qkv_blhd(1, 16, 2, 2, 8, torch.float32)
    monkeypatch.setenv(cpu_kernel.ENV, "0")
    sdpa_attention(q, k, v, layout)
    assert kernel_used == []


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("blocks", [(3, 5), (128, 512)], ids=lambda b: f"q{b[0]}k{b[1]}")
def test_kernel_half_storage_float32_math(dtype, blocks, monkeypatch, kernel_used):
    """bf16/fp16 rows are converted to float32 per task and every result is rounded once: the outputs are the
    float64 oracle's (on the same half-precision inputs) to about one half-precision rounding, and no worse than
    the stock path (torch's kernel on half inputs)."""
    monkeypatch.setattr(cpu_kernel, "Q_BLOCK", blocks[0])
    monkeypatch.setattr(cpu_kernel, "KV_BLOCK", blocks[1])
    L = 300
    layout = AnchorLayout.from_doc_ids(torch.tensor([row([40, 1, 150, 7, 90], L), row([299], L)]))
    q, k, v = qkv_blhd(2, L, 4, 2, 16, dtype, seed=4)
    dout = torch.randn(2, L, 4, 16, dtype=torch.float64).to(dtype)
    got = grads(sdpa_attention, q, k, v, layout, dout)
    with cpu_kernel.disabled():
        stock = grads(sdpa_attention, q, k, v, layout, dout)
    want = grads(reference_attention, *(t.double() for t in (q, k, v)), layout, dout.double())
    assert kernel_used == [layout.num_segments] and all(t.dtype == dtype for t in got)
    eps = torch.finfo(dtype).eps
    for name, a, s, w in zip(("out", "dq", "dk", "dv"), got, stock, want):
        err = ((a.double() - w).abs() / (w.abs() + 1)).max().item()
        err_stock = ((s.double() - w).abs() / (w.abs() + 1)).max().item()
        assert err <= 2 * eps, (name, err, eps)
        assert err <= err_stock + eps / 2, (name, err, err_stock)


def test_env_value_is_checked(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV, "yes")
    with pytest.raises(ValueError, match="ANCHORCONTEXT_CPU_KERNEL must be 'auto', '0' or '1', got 'yes'"):
        cpu_kernel.get()


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog, kernel_used):
    def broken():
        raise OSError("no compiler")

    monkeypatch.setattr(cpu_kernel, "_build", broken)
    monkeypatch.setattr(cpu_kernel, "_state", {"tried": False, "module": None, "error": None})
    layout = AnchorLayout.from_doc_ids(torch.tensor([row([5, 9], 16)]))
    q, k, v = qkv_blhd(1, 16, 2, 2, 8, torch.float64)
    with caplog.at_level(logging.WARNING, logger="anchorcontext"):
        out = sdpa_attention(q, k, v, layout)
        sdpa_attention(q, k, v, layout)
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "could not be built (OSError: no compiler)" in caplog.records[0].getMessage()
    assert kernel_used == []
    torch.testing.assert_close(out, reference_attention(q, k, v, layout), rtol=1e-10, atol=1e-10)
    monkeypatch.setenv(cpu_kernel.ENV, "1")
    with pytest.raises(RuntimeError, match="ANCHORCONTEXT_CPU_KERNEL=1 but the CPU attention kernel could not be built"):
        sdpa_attention(q, k, v, layout)


@needs_kernel
def test_kernel_builds_where_a_compiler_exists():
    """CI has g++: the fast path must really be there (a broken build would otherwise only warn)."""
    module = cpu_kernel.get()
    assert module is not None, cpu_kernel._state["error"]
    assert cpu_kernel._isa()[0] in module.__name__
    assert module.__name__ == cpu_kernel.build_name()


def test_build_name_keys_torch_python_compiler_and_flags(monkeypatch):
    """Venvs sharing TORCH_EXTENSIONS_DIR with another torch, Python, compiler or flags get their own build."""
    monkeypatch.delenv("CXX", raising=False)
    name = cpu_kernel.build_name()
    assert name.isidentifier() and cpu_kernel._isa()[0] in name
    assert torch.__version__.replace(".", "_").replace("+", "_") in name
    monkeypatch.setattr(torch, "__version__", "9.9.9+cpu")
    other_torch = cpu_kernel.build_name()
    assert "torch9_9_9_cpu" in other_torch and other_torch != name
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "clang++")
    assert cpu_kernel.build_name() != name
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(cpu_kernel, "CFLAGS", (*cpu_kernel.CFLAGS, "-ffast-math"))
    assert cpu_kernel.build_name() != name


def test_first_build_prints_one_line(monkeypatch, tmp_path, capsys):
    """Library users see that the first call compiles for ~40 s; a cached build loads without a word."""
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    names = []

    def fake_load(name, **kw):
        names.append(name)
        (tmp_path / name / f"{name}.so").write_bytes(b"")
        return object()

    monkeypatch.setattr(ext, "load", fake_load)
    cpu_kernel._build()
    assert capsys.readouterr().err.strip() == cpu_kernel.BUILD_MESSAGE
    cpu_kernel._build()
    assert capsys.readouterr().err == ""
    assert names == [cpu_kernel.build_name()] * 2


@pytest.fixture
def lock_file(monkeypatch, tmp_path):
    """A build lock in a temporary TORCH_EXTENSIONS_DIR, and a stand-in ``load`` that records whether the lock was
    still there when it ran (torch's own ``load`` would wait on it forever)."""
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / cpu_kernel.build_name() / "lock"
    lock.parent.mkdir()
    lock.write_bytes(b"")
    calls = []
    monkeypatch.setattr(ext, "load", lambda name, **kw: calls.append(lock.exists()) or object())
    return lock, calls


def test_stale_build_lock_is_removed_with_a_warning(lock_file, monkeypatch, caplog):
    """An interrupted build leaves torch's lock file behind; every later process waited on it, silently, forever."""
    lock, calls = lock_file
    old = time.time() - cpu_kernel.LOCK_STALE_S - 60
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="anchorcontext"):
        cpu_kernel._build()
    assert calls == [False] and not lock.exists()
    [record] = caplog.records
    assert f"removing the stale lock file {lock} (660 s old" in record.getMessage()


def test_fresh_build_lock_is_waited_for_then_removed_once_stale(lock_file, monkeypatch, caplog):
    lock, calls = lock_file
    monkeypatch.setenv(cpu_kernel.LOCK_ENV, "0.5")
    monkeypatch.setattr(cpu_kernel, "LOCK_NOTICE_S", 0.0)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="anchorcontext"):
        cpu_kernel._build()
    assert calls == [False] and not lock.exists()
    assert 0.3 <= time.monotonic() - start < 5
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith(f"anchorcontext: waiting for {lock} ") and "removed as stale at 0.5 s" in messages[0]
    assert f"removing the stale lock file {lock} " in messages[1]


def test_build_lock_released_by_its_builder_is_left_alone(lock_file, monkeypatch, caplog):
    """Another process finishing its build removes the lock itself: we wait, then load, and remove nothing."""
    lock, calls = lock_file
    timer = threading.Timer(0.3, lock.unlink)
    timer.start()
    with caplog.at_level(logging.WARNING, logger="anchorcontext"):
        cpu_kernel._build()
    timer.join()
    assert calls == [False] and caplog.records == []


@pytest.mark.parametrize("value", ["ten", "0", "-5", "inf"])
def test_lock_limit_env_is_checked(monkeypatch, value):
    monkeypatch.setenv(cpu_kernel.LOCK_ENV, value)
    monkeypatch.setattr(cpu_kernel, "_state", {"tried": False, "module": None, "error": None})
    with pytest.raises(ValueError, match=f"ANCHORCONTEXT_CPU_KERNEL_LOCK_S must be a positive number of seconds, got '{value}'"):
        cpu_kernel.get()


@needs_kernel
@pytest.mark.parametrize("heads", [(4, 4), (6, 3), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_kernel_threads_agree(heads, kernel_used):
    """Two threads (tasks split over kv heads and segments; the anchor's dK/dV terms per task, summed after
    the loop) give the one-thread result: no races on the shared anchor row or on a GQA group's dK/dV."""
    layout = AnchorLayout.from_doc_ids(torch.tensor([row([40, 1, 300, 7, 90], 500), row([200, 250], 500)]))
    q, k, v = qkv_blhd(2, 500, *heads, 16, torch.float64, seed=3)
    dout = torch.randn(2, 500, heads[0], 16, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads(sdpa_attention, q, k, v, layout, dout)
        torch.set_num_threads(2)
        two = grads(sdpa_attention, q, k, v, layout, dout)
    finally:
        torch.set_num_threads(before)
    assert kernel_used == [layout.num_segments] * 2
    want = grads(reference_attention, q, k, v, layout, dout)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), one, two, want):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-10, msg=name)
