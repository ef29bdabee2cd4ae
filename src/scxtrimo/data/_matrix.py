"""Uniform, chunked row access to an AnnData matrix, in memory or backed on disk.

Dense, CSR, CSC and COO matrices, views and backed ``.h5ad`` files are all read as CSR chunks
of contiguous rows, so peak memory depends on the chunk size, never on the number of cells.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp
from anndata import AnnData


def get_matrix(adata: AnnData, layer: str | None = None) -> Any:
    """The matrix holding the model input: ``adata.layers[layer]`` or ``adata.X``.

    Raises
    ------
    KeyError
        If ``layer`` does not exist (the message lists the layers that do).
    ValueError
        If the matrix is missing.
    """
    if layer is None:
        matrix = adata.X
        if matrix is None:
            raise ValueError(
                "adata.X is empty (None). Put the raw counts in adata.X or pass layer=<name of "
                f"the counts layer> (layers: {list(adata.layers.keys()) or 'none'})."
            )
        return matrix
    if layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} not found in adata.layers; available layers: "
            f"{list(adata.layers.keys()) or 'none'} (layer=None uses adata.X)."
        )
    return adata.layers[layer]


def is_backed_sparse(matrix: Any) -> bool:
    """Whether ``matrix`` is an on-disk anndata sparse dataset."""
    return hasattr(matrix, "format") and hasattr(matrix, "group") and not sp.issparse(matrix)


def as_row_accessible(matrix: Any) -> Any:
    """A version of ``matrix`` whose row slices are cheap (COO and CSC become CSR, once)."""
    if sp.issparse(matrix) and matrix.format in ("coo", "csc", "lil", "dok", "bsr", "dia"):
        return sp.csr_matrix(matrix)
    if is_backed_sparse(matrix) and matrix.format == "csc":
        raise ValueError(
            "The backed matrix is stored as CSC, which cannot be read row by row without "
            "loading it whole. Rewrite it as CSR (e.g. adata = ad.read_h5ad(path); "
            "adata.X = adata.X.tocsr(); adata.write_h5ad(path)) or load it into memory."
        )
    return matrix


def read_rows(matrix: Any, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of ``matrix`` as a CSR matrix (canonical dtypes)."""
    block = matrix[start:stop]
    if not sp.issparse(block):
        block = np.asarray(block)
        if block.ndim == 1:
            block = block.reshape(1, -1)
        if block.dtype == np.float16:  # scipy.sparse has no float16
            block = block.astype(np.float32)
        block = sp.csr_matrix(block)
    elif block.format != "csr":
        block = sp.csr_matrix(block)
    return block


def iter_row_chunks(
    matrix: Any, chunk_size: int, wanted: np.ndarray | None = None
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(start, rows start:start+chunk_size as CSR)`` over the matrix.

    An in-memory CSR matrix is yielded whole (no copy): the kernels index its rows directly.
    With ``wanted`` (a boolean mask over rows), chunks without a wanted row are never read, so
    embedding a few cells of a large backed file reads only the chunks that hold them.
    """
    matrix = as_row_accessible(matrix)
    n = matrix.shape[0]
    if sp.issparse(matrix) and matrix.format == "csr":
        yield 0, matrix
        return
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        if wanted is not None and not wanted[start:stop].any():
            continue
        yield start, read_rows(matrix, start, stop)


def rows_as_csr(matrix: Any, cells: np.ndarray, chunk: int = 10_000) -> sp.csr_matrix:
    """Rows ``cells`` (sorted, unique) of an in-memory or backed matrix, as one CSR matrix."""
    matrix = as_row_accessible(matrix)
    if sp.issparse(matrix) or isinstance(matrix, np.ndarray):
        return sp.csr_matrix(matrix[cells])
    blocks = []
    for start in range(0, len(cells), chunk):
        part = cells[start : start + chunk]
        block = read_rows(matrix, int(part[0]), int(part[-1]) + 1)
        blocks.append(block[part - part[0]])
    return sp.vstack(blocks, format="csr")
