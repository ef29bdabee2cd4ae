"""Label votes of nearest neighbours: class shares of each query cell among its reference neighbours."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd


def _class_order(labels: pd.Series) -> list:
    """The classes of ``labels``: its categories (in order) if categorical, else sorted."""
    present = labels.dropna()
    if isinstance(labels.dtype, pd.CategoricalDtype):
        used = set(present.unique())
        return [c for c in labels.cat.categories if c in used]
    return sorted(present.unique().tolist(), key=str)


def knn_vote(
    query: np.ndarray,
    reference: np.ndarray,
    labels: pd.Series | np.ndarray,
    *,
    k: int = 15,
    weights: Literal["distance", "uniform"] = "distance",
    metric: str = "euclidean",
) -> tuple[list, np.ndarray]:
    """Class vote shares of each query cell among its ``k`` nearest reference cells.

    Parameters
    ----------
    query
        Query embedding, cells x dimensions; rows with NaN get NaN shares.
    reference
        Reference embedding; rows with NaN or a missing label are left out.
    labels
        One label per reference row.
    k
        Neighbours (at most the number of usable reference cells).
    weights
        ``"distance"``: each neighbour votes with ``1 / (distance + eps)`` (``eps`` = 1e-6 of
        the median neighbour distance, so duplicates do not divide by zero); ``"uniform"``:
        one vote each.
    metric
        Distance of :class:`sklearn.neighbors.NearestNeighbors` (``"euclidean"``,
        ``"cosine"``...).

    Returns
    -------
    classes
        The classes, in column order.
    shares
        ``float64`` array ``[query cells, classes]``; each finite row sums to 1.
    """
    from sklearn.neighbors import NearestNeighbors

    if weights not in ("distance", "uniform"):
        raise ValueError(f"weights must be 'distance' or 'uniform', not {weights!r}.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    labels = (
        pd.Series(np.asarray(labels, dtype=object)) if not isinstance(labels, pd.Series) else labels
    )
    labels = labels.reset_index(drop=True)
    query = np.asarray(query, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"Query and reference embeddings must be 2-D with the same width; got "
            f"{query.shape} and {reference.shape}."
        )
    usable = np.isfinite(reference).all(axis=1) & labels.notna().to_numpy()
    if not usable.any():
        raise ValueError("The reference has no cell with both a finite embedding and a label.")
    classes = _class_order(labels[usable])
    codes = pd.Categorical(labels[usable], categories=classes).codes
    ref = reference[usable]
    n_neighbors = min(int(k), ref.shape[0])
    shares = np.full((query.shape[0], len(classes)), np.nan)
    finite = np.isfinite(query).all(axis=1)
    if finite.any():
        nn = NearestNeighbors(n_neighbors=n_neighbors, metric=metric).fit(ref)
        dist, ind = nn.kneighbors(query[finite])
        if weights == "distance":
            positive = dist[dist > 0]
            eps = 1e-6 * (np.median(positive) if positive.size else 1.0)
            w = 1.0 / (dist + eps)
        else:
            w = np.ones_like(dist)
        votes = np.zeros((ind.shape[0], len(classes)))
        rows = np.repeat(np.arange(ind.shape[0]), ind.shape[1])
        np.add.at(votes, (rows, codes[ind].ravel()), w.ravel())
        shares[finite] = votes / votes.sum(axis=1, keepdims=True)
    return classes, shares
