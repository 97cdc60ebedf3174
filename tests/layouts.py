"""Random valid layouts for property tests, shared by tests/test_layout.py and tests/test_backends.py: a hypothesis
strategy for ``(B, L)`` doc-id batches in the package's convention (anchor, documents, trailing padding)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def doc_id_batches(draw, max_rows=3, max_len=24):
    """Valid ``(B, L)`` doc ids: anchor, documents of random lengths >= 1, trailing padding."""
    B = draw(st.integers(1, max_rows))
    L = draw(st.integers(1, max_len))
    rows = []
    for _ in range(B):
        row = [0]
        n_real = draw(st.integers(0, L - 1))
        doc = 0
        while len(row) < 1 + n_real:
            doc += 1
            row += [doc] * min(draw(st.integers(1, 8)), 1 + n_real - len(row))
        rows.append(row + [-1] * (L - len(row)))
    return torch.tensor(rows)
