"""What every row source shares: checked row positions, CSR blocks, and what identifies a source."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp


def as_csr(block: Any) -> sp.csr_matrix:
    """A CSR matrix with dtypes the kernels take (dense blocks and float16 converted)."""
    if not sp.issparse(block):
        block = np.asarray(block)
        if block.ndim == 1:
            block = block.reshape(1, -1)
        if block.dtype == np.float16:
            block = block.astype(np.float32)
        return sp.csr_matrix(block)
    block = sp.csr_matrix(block) if block.format != "csr" else block
    if block.dtype == np.float16:
        block = block.astype(np.float32)
    return block


def check_rows(rows: np.ndarray, n_obs: int, name: str) -> np.ndarray:
    """``rows`` as sorted, unique ``int64`` positions in ``0..n_obs-1`` (``name``: the source, in errors)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1:
        raise ValueError(f"{name}: rows must be a 1-d array of positions.")
    if rows.size and (rows[0] < 0 or rows[-1] >= n_obs):
        raise IndexError(f"{name}: rows must be in [0, {n_obs}); got {rows[0]}..{rows[-1]}.")
    if rows.size > 1 and np.any(np.diff(rows) <= 0):
        raise ValueError(f"{name}: rows must be sorted and unique.")
    return rows


def file_size(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder (a zarr store)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fingerprint_of(source: Any) -> dict:
    """What identifies a row source: its own ``fingerprint()``, else kind, name and shape."""
    fp = getattr(source, "fingerprint", None)
    if callable(fp):
        return fp()
    return {"kind": type(source).__name__, "name": source.name, "shape": list(source.shape)}
