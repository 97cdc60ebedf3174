"""Fakes of torch's ``torch.nn.attention.varlen.varlen_attn`` with the signatures of torch 2.10, 2.11 and 2.12+, each
computing what torch's kernel computes (flash semantics: causal iff ``window_size == (-1, 0)`` from 2.11), and the
``fake_cuda_torch_varlen`` fixture that routes ``varlen_attention`` to one of them on CPU. Shared by
tests/test_backends.py and tests/test_varlen_merge.py."""

from __future__ import annotations

import flash_standin
import pytest
import torch

from anchorcontext.attention import varlen


def torch_2_10_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert query.shape[1] == key.shape[1], "torch 2.10 varlen_attn has no GQA"
    return flash_standin.flash_attn_varlen_func(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=is_causal)


def torch_2_11_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):
    assert query.shape[1] == key.shape[1], "torch 2.11 varlen_attn has no GQA"
    return flash_standin.flash_attn_varlen_func(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, softmax_scale=scale,
        causal=window_size == (-1, 0), window_size=tuple(window_size),
    )


def torch_2_12_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert enable_gqa or query.shape[1] == key.shape[1]
    return flash_standin.flash_attn_varlen_func(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, softmax_scale=scale,
        causal=window_size == (-1, 0), window_size=tuple(window_size),
    )


@pytest.fixture
def fake_cuda_torch_varlen(monkeypatch):
    """Route varlen_attention to a fake torch varlen_attn on CPU, with the real availability checks
    evaluated as if on CUDA (flash-attn absent)."""
    monkeypatch.setattr(varlen, "_KERNEL_OVERRIDE", None)
    monkeypatch.setattr(varlen, "flash_varlen_kernel", lambda: (None, "flash-attn not importable (test)"))
    real = varlen.unavailable_reason
    monkeypatch.setattr(varlen, "unavailable_reason", lambda device, *a: real(torch.device("cuda"), *a))

    def use(fn):
        monkeypatch.setattr(varlen, "torch_varlen_func", lambda: (fn, "torch"))

    return use
