"""``scxtrimo.tl.annotate``: cell-type annotation with a fine-tuned model or a reference."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import numpy as np
from anndata import AnnData

from scxtrimo._docs import DOCS, doc_params
from scxtrimo.metrics import knn_vote

from ._common import copied_if, is_data, load_model, record, skipped_cells, target_of
from ._transfer import _embeddings, _reference_labels, _row_max, _write_labels

if TYPE_CHECKING:
    from mudata import MuData

    from scxtrimo.model import XTrimoGene


@doc_params(**DOCS)
def annotate(
    query: AnnData | MuData,
    model_or_reference: XTrimoGene | str | os.PathLike | AnnData | MuData,
    *,
    labels_key: str | None = None,
    key_added: str = "scxtrimo_label",
    model: XTrimoGene | str | os.PathLike | None = None,
    use_rep: str = "X_scxtrimo",
    k: int = 15,
    layer: str | None = None,
    gene_symbols_key: str | None = None,
    gene_ids_key: str | None = None,
    input_type: Literal["counts", "log1p", "bulk"] | None = None,
    total_counts_key: str | None = None,
    batch_size: int | None = None,
    max_genes: int | None = None,
    invalid_cells: Literal["raise", "skip"] = "raise",
    mod: str = "rna",
    device: str | None = None,
    progress_bar: bool | None = None,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Annotate cell types with a fine-tuned model, or from a labelled reference.

    With a model fine-tuned through ``model.train(finetune=...)``, the classification head
    gives each cell a probability per class. With a labelled reference AnnData instead, the
    probabilities are the distance-weighted vote shares of the cell's ``k`` nearest
    reference cells in the embedding (as in :func:`~scxtrimo.tl.transfer_labels`). Nothing
    but the keys listed below is changed.

    Parameters
    ----------
    query
        Cells to annotate (raw counts unless the model was set up otherwise). A
        :class:`~mudata.MuData` is annotated through its modality ``mod``.
    model_or_reference
        A fine-tuned :class:`~scxtrimo.model.XTrimoGene` or the folder it was saved to; or a
        labelled reference AnnData / MuData (then ``labels_key`` is required).
    labels_key
        Reference ``obs`` column of labels (reference only).
    key_added
        Base name of the outputs.
    model
        Reference only: model to embed query and reference with when either lacks
        ``.obsm[use_rep]``.
    use_rep
        Reference only: ``.obsm`` key of the embeddings.
    k
        Reference only: neighbours.
    {doc_input_settings}
    batch_size, invalid_cells
        How to embed the cells; see :func:`scxtrimo.tl.embed`.
    max_genes
        Model only: cap on gene tokens per cell (default: as in fine-tuning).
    mod
        Modality of a MuData.
    device, progress_bar
        Where to compute; progress bar.
    copy
        Return a modified copy of ``query`` instead of writing into it.

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Sets

    ``.obs[key_added]``
        Categorical: the most probable class (NaN for skipped cells).
    ``.obs[f"{key_added}_confidence"]``
        ``float32``: the probability of that class.
    ``.obsm[f"{key_added}_probabilities"]``
        ``float32`` array ``[cells, classes]``; column ``j`` is class
        ``.uns["scxtrimo"][key_added]["classes"][j]``.
    ``.uns["scxtrimo"][key_added]``
        ``method`` (``"classifier"`` or ``"knn"``), ``classes``, the model or reference
        settings and the scxtrimo version.

    Examples
    --------
    >>> XTrimoGene.setup_anndata(reference, labels_key="cell_type")
    >>> model = XTrimoGene(reference, config="small")  # or XTrimoGene.load + add_classifier
    >>> model.train(max_epochs=5, finetune="last_layers")
    >>> scxtrimo.tl.annotate(query, model)
    >>> query.obs[["scxtrimo_label", "scxtrimo_label_confidence"]]
    """
    query = copied_if(query, copy)
    target = target_of(query, mod)
    overrides = {
        "layer": layer,
        "gene_symbols_key": gene_symbols_key,
        "gene_ids_key": gene_ids_key,
        "input_type": input_type,
        "total_counts_key": total_counts_key,
    }
    if is_data(model_or_reference):
        if labels_key is None:
            raise ValueError("Annotating from a reference AnnData needs labels_key=<obs column>.")
        ref = target_of(model_or_reference, mod)
        labels = _reference_labels(ref, labels_key)
        q_emb, r_emb, source = _embeddings(
            target,
            ref,
            model=model,
            use_rep=use_rep,
            embed_kwargs={
                "input": overrides,
                "batch_size": batch_size,
                "invalid_cells": invalid_cells,
                "device": device,
                "progress_bar": progress_bar,
            },
        )
        classes, probabilities = knn_vote(q_emb, r_emb, labels, k=k)
        probabilities = probabilities.astype(np.float32)
        params = {
            "method": "knn",
            "k": int(k),
            "use_rep": source,
            "labels_key": labels_key,
            "n_reference_cells": int(ref.n_obs),
        }
    else:
        if labels_key is not None:
            raise ValueError(
                "labels_key is for a reference AnnData; a fine-tuned model brings its classes."
            )
        net = load_model(model_or_reference, device=device)
        probabilities = net.predict(
            target,
            soft=True,
            batch_size=batch_size,
            max_genes=max_genes,
            invalid_cells=invalid_cells,
            device=device,
            progress_bar=progress_bar,
            **overrides,
        ).to_numpy(dtype=np.float32)
        classes = net.label_categories
        params = {
            "method": "classifier",
            "model": net.source_,
            "finetune": net.classifier_.get("finetune"),
            "labels_key": net.classifier_.get("labels_key"),
        }
    _write_labels(target, key_added, classes, probabilities)
    target.obs[f"{key_added}_confidence"] = _row_max(probabilities)
    target.obsm[f"{key_added}_probabilities"] = probabilities
    skipped = skipped_cells(target, np.flatnonzero(~np.isfinite(probabilities).all(axis=1)))
    record(target, key_added, {**params, "classes": [str(c) for c in classes], **skipped})
    return query if copy else None
