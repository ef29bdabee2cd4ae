"""``scxtrimo.tl.transfer_labels``: label transfer by k nearest neighbours in embedding space."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from scxtrimo._docs import DOCS, doc_params
from scxtrimo.inference import embed_prepared
from scxtrimo.metrics import knn_vote

from ._common import copied_if, load_model, record, skipped_cells, target_of

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
    net = load_model(model, device=embed_kwargs.get("device"))
    settings = net.input_settings.merge(**embed_kwargs.get("input", {}))
    out = []
    for data in (query, reference):
        prep = net.prepare_input(
            data,
            target_depth=embed_kwargs.get("target_depth"),
            invalid=embed_kwargs.get("invalid_cells", "raise"),
            input_settings=settings,
        )
        out.append(
            embed_prepared(
                net.module,
                prep,
                batch_size=embed_kwargs.get("batch_size"),
                device=embed_kwargs.get("device"),
                progress_bar=embed_kwargs.get("progress_bar"),
            )
        )
    return out[0], out[1], f"computed with {net.source_}"


@doc_params(**DOCS)
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
        :func:`~scxtrimo.metrics.knn_vote`.
    metric
        Distance for the neighbour search.
    {doc_input_settings}
    target_depth, batch_size, invalid_cells
        How to embed, when embedding here (the input settings too: the same for both
        objects); see :func:`scxtrimo.tl.embed`.
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
            "input": {
                "layer": layer,
                "gene_symbols_key": gene_symbols_key,
                "gene_ids_key": gene_ids_key,
                "input_type": input_type,
                "total_counts_key": total_counts_key,
            },
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
            **skipped_cells(target, np.flatnonzero(~np.isfinite(shares).all(axis=1))),
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
