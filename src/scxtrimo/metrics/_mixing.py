"""Batch mixing of an embedding: how evenly batches share each cell's neighbourhood."""

from __future__ import annotations

import numpy as np


def _codes(batches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    names, codes = np.unique(np.asarray(batches).astype(str), return_inverse=True)
    return codes.ravel(), names


def _entropy(p: np.ndarray) -> np.ndarray:
    """Row-wise Shannon entropy (natural log; 0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=1)


def batch_mixing(embedding: np.ndarray, batches: np.ndarray, k: int = 50) -> float:
    """Mean over cells of the normalised Shannon entropy of batches among ``k`` neighbours.

    Each cell's ``k`` nearest neighbours (Euclidean, the cell itself excluded) give batch
    shares ``p``; the cell's score is ``-sum p log p / log(n_batches)``: 0 when all neighbours
    share its batch, 1 when every batch is equally present. Compare with
    :func:`well_mixed_batch_mixing`, the score of a perfectly mixed embedding (below 1 when the
    batches differ in size).

    Parameters
    ----------
    embedding
        ``[cells, d]``.
    batches
        ``[cells]`` batch labels.
    k
        Neighbourhood size (capped at ``cells - 1``).

    Returns
    -------
    The score in ``[0, 1]``.

    Raises
    ------
    ValueError
        With fewer than two batches, or when the shapes disagree.
    """
    from sklearn.neighbors import NearestNeighbors

    codes, names = _codes(batches)
    if len(codes) != len(embedding):
        raise ValueError(f"{len(embedding)} embedded cells but {len(codes)} batch labels.")
    n_batches = len(names)
    if n_batches < 2:
        raise ValueError("Batch mixing needs at least two batches.")
    k = min(k, len(codes) - 1)
    neighbours = NearestNeighbors(n_neighbors=k).fit(embedding).kneighbors(return_distance=False)
    rows = np.repeat(np.arange(len(codes)), k)
    counts = np.bincount(
        rows * n_batches + codes[neighbours].ravel(), minlength=len(codes) * n_batches
    ).reshape(len(codes), n_batches)
    return float(np.mean(_entropy(counts / k)) / np.log(n_batches))


def well_mixed_batch_mixing(batches: np.ndarray) -> float:
    """:func:`batch_mixing` of a perfectly mixed embedding: the entropy of the batch shares."""
    codes, names = _codes(batches)
    shares = np.bincount(codes, minlength=len(names)) / len(codes)
    return float(_entropy(shares[None, :])[0] / np.log(len(names)))
