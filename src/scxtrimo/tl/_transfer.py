"""``scxtrimo.tl.transfer_labels``: label transfer by k nearest neighbours in embedding space."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from ._common import SETUP_KEYS, copied_if, record, resolve_model, setup_overrides, target_of

if TYPE_CHECKING:
    from mudata import MuData

    from scxtrimo.model import XTrimoGene


def _reference_labels(reference: AnnData, labels_key: str) -> pd.Series:
    if labels_key not in reference.obs.columns:
        raise KeyError(
            f"labels_key={labels_key!r} is not a column of the reference's obs; columns: "
            f"{list(reference.obs.columns) or 'none'}."
        )
    return reference.obs[labels_key]


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


def _embeddings(
    query: AnnData,
    reference: AnnData,
    *,
    model,
    use_rep: str,
    embed_kwargs: dict,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Query and reference embeddings: ``.obsm[use_rep]`` of both, or computed by one model."""
    if use_rep in query.obsm and use_rep in reference.obsm:
        return np.asarray(query.obsm[use_rep]), np.asarray(reference.obsm[use_rep]), use_rep
    net = resolve_model(model, device=embed_kwargs.get("device"))
    out = []
    for data in (query, reference):
        prep = net.prepare_input(
            data,
            target_depth=embed_kwargs.get("target_depth"),
            invalid=embed_kwargs.get("invalid_cells", "raise"),
            **{k: embed_kwargs.get(k) for k in SETUP_KEYS},
        )
        out.append(
            net._latent_from_prepared(
                prep,
                batch_size=embed_kwargs.get("batch_size"),
                device=embed_kwargs.get("device"),
                progress_bar=embed_kwargs.get("progress_bar"),
            )
        )
    return out[0], out[1], f"computed with {net.source_}"


def transfer_labels(
    query: AnnData | MuData,
    reference: AnnData | MuData,
    *,
    labels_key: str,
    k: int = 15,
    model: XTrimoGene | str | os.PathLike | None = None,
    use_rep: str = "X_scxtrimo",
    key_added: str | None = None,
    weights: Literal["distance", "uniform"] = "distance",
    metric: str = "euclidean",
    layer: str | None = None,
    gene_symbols_key: str | None = None,
    gene_ids_key: str | None = None,
    input_type: Literal["counts", "log1p", "bulk"] | None = None,
    total_counts_key: str | None = None,
    target_depth: float | str | None = None,
    batch_size: int | None = None,
    invalid_cells: Literal["raise", "skip"] = "raise",
    mod: str = "rna",
    device: str | None = None,
    progress_bar: bool | None = None,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Transfer cell-type labels from a reference by k nearest neighbours, without training.

    Each query cell takes the label with the largest distance-weighted vote among its ``k``
    nearest reference cells in the scxtrimo embedding; its uncertainty is
    ``1 - winning vote share`` (0: all neighbours agree). The embeddings are
    ``.obsm[use_rep]`` of both objects when both have it (e.g. from
    :func:`scxtrimo.tl.embed` with the same model); otherwise both are embedded with
    ``model`` here (and not stored), so that query and reference always come from one model.

    Parameters
    ----------
    query
        Cells to label. A :class:`~mudata.MuData` is labelled through its modality ``mod``.
    reference
        Labelled cells (AnnData or MuData, modality ``mod``); not modified.
    labels_key
        ``reference.obs`` column of labels; reference cells without a label are not used.
    k
        Neighbours.
    model
        Model to embed with when ``use_rep`` is missing from either object (an
        :class:`~scxtrimo.model.XTrimoGene`, a saved-model folder, ``models.ckpt``, or
        ``None`` for the shipped model).
    use_rep
        ``.obsm`` key of the embeddings.
    key_added
        ``query.obs`` column for the labels; default ``f"{labels_key}_transferred"``.
    weights
        ``"distance"`` (inverse-distance votes) or ``"uniform"``; see
        :func:`~scxtrimo.tl.knn_vote`.
    metric
        Distance for the neighbour search.
    layer, gene_symbols_key, gene_ids_key, input_type, total_counts_key, target_depth, batch_size, invalid_cells
        How to embed, when embedding here (same for both objects); see
        :func:`scxtrimo.tl.embed`.
    mod
        Modality of a MuData query / reference.
    device, progress_bar
        For embedding here.
    copy
        Return a modified copy of ``query`` instead of writing into it.

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Sets

    ``query.obs[key_added]``
        Categorical: the transferred label (NaN for cells without an embedding).
    ``query.obs[f"{key_added}_uncertainty"]``
        ``1 - `` the winning label's share of the (weighted) vote, in ``[0, 1)``.
    ``query.uns["scxtrimo"][key_added]``
        Parameters: ``k``, ``weights``, ``metric``, ``use_rep``, the classes, reference size.

    Examples
    --------
    >>> scxtrimo.tl.embed(reference, model)
    >>> scxtrimo.tl.embed(query, model)
    >>> scxtrimo.tl.transfer_labels(query, reference, labels_key="cell_type")
    >>> query.obs[["cell_type_transferred", "cell_type_transferred_uncertainty"]]
    """
    query = copied_if(query, copy)
    target = target_of(query, mod)
    ref = target_of(reference, mod)
    key_added = f"{labels_key}_transferred" if key_added is None else key_added
    labels = _reference_labels(ref, labels_key)
    q_emb, r_emb, source = _embeddings(
        target,
        ref,
        model=model,
        use_rep=use_rep,
        embed_kwargs={
            **setup_overrides(layer, gene_symbols_key, gene_ids_key, input_type, total_counts_key),
            "target_depth": target_depth,
            "batch_size": batch_size,
            "invalid_cells": invalid_cells,
            "device": device,
            "progress_bar": progress_bar,
        },
    )
    classes, shares = knn_vote(q_emb, r_emb, labels, k=k, weights=weights, metric=metric)
    _write_labels(target, key_added, classes, shares)
    target.obs[f"{key_added}_uncertainty"] = 1.0 - _row_max(shares)
    record(
        target,
        key_added,
        {
            "method": "knn",
            "k": int(k),
            "weights": weights,
            "metric": metric,
            "use_rep": source,
            "labels_key": labels_key,
            "classes": [str(c) for c in classes],
            "n_reference_cells": int(ref.n_obs),
        },
    )
    return query if copy else None


def _row_max(probabilities: np.ndarray) -> np.ndarray:
    """Largest entry of each row (``float32``); NaN for rows that are not finite."""
    finite = np.isfinite(probabilities).all(axis=1)
    out = np.full(probabilities.shape[0], np.nan, dtype=np.float32)
    if finite.any():
        out[finite] = probabilities[finite].max(axis=1)
    return out


def _write_labels(target: AnnData, key: str, classes: list, probabilities: np.ndarray) -> None:
    """``obs[key]``: the most probable class per cell, as a categorical (NaN where undefined)."""
    finite = np.isfinite(probabilities).all(axis=1)
    codes = np.full(probabilities.shape[0], -1, dtype=np.int64)
    if finite.any():
        codes[finite] = probabilities[finite].argmax(axis=1)
    target.obs[key] = pd.Categorical.from_codes(codes, categories=pd.Index(classes))
