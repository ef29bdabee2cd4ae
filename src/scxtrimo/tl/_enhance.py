"""``scxtrimo.tl.enhance``: read-depth enhancement of expression profiles."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from anndata import AnnData

from scxtrimo._docs import DOCS, doc_params
from scxtrimo.inference import iter_decoder

from ._common import gene_columns, record, skipped_cells, start_tool

if TYPE_CHECKING:
    from mudata import MuData

    from scxtrimo.model import XTrimoGene


@doc_params(**DOCS)
def enhance(
    adata: AnnData | MuData,
    model: XTrimoGene | str | os.PathLike | None = None,
    *,
    target_depth: float | str = "fold:10",
    genes: Sequence[str] | None = None,
    key_added: str = "scxtrimo_enhanced",
    batch_size: int = 8,
    layer: str | None = None,
    gene_symbols_key: str | None = None,
    gene_ids_key: str | None = None,
    input_type: Literal["counts", "log1p"] | None = None,
    total_counts_key: str | None = None,
    invalid_cells: Literal["raise", "skip"] = "raise",
    dtype: np.dtype | type = np.float32,
    mod: str = "rna",
    device: str | None = None,
    progress_bar: bool | None = None,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Read-depth enhancement: each cell's expression as if it had been sequenced deeper.

    The model's decoder predicts every gene of a cell from its non-zero genes, with the
    target-depth token ``T`` set above the cell's own depth ``S`` (scFoundation's read-depth
    enhancement). Predictions are on the ``log1p(x / total * 1e4)`` scale, like
    ``sc.pp.normalize_total(target_sum=1e4); sc.pp.log1p``, and are written for the
    AnnData's own genes, in its column order. Cells are decoded ``batch_size`` at a time, so
    working memory is bounded by ``batch_size`` x 19,266 decoder positions whatever the
    number of cells; the output itself is a dense ``cells x genes`` layer.

    Parameters
    ----------
    adata
        Raw counts (``.X`` or ``layer``), in memory. A :class:`~mudata.MuData` is enhanced
        through its modality ``mod``.
    model
        An :class:`~scxtrimo.model.XTrimoGene`, a saved-model folder, the scFoundation
        ``models.ckpt`` (its ``"cell"`` sub-model; for enhancement load the ``"gene"`` or
        ``"rde"`` sub-model with :meth:`~scxtrimo.model.XTrimoGene.from_scfoundation` and
        pass it), or ``None`` for the shipped model.
    target_depth
        ``T``: ``"fold:10"`` (default: ten times the cell's depth), ``"add:1"`` (one log10
        unit deeper), ``4.0`` / ``"t4"`` (10,000 counts)...; see
        :class:`~scxtrimo.data.TargetDepth`. ``"fold:1"`` predicts at the cell's own depth.
    genes
        ``var_names`` to predict; ``None`` for every gene of ``adata`` in the vocabulary.
        Only these columns are filled, the others are NaN; the computation costs the same
        (the decoder always spans all genes), the gain is a sparser result to look at.
    key_added
        Layer to write.
    batch_size
        Cells per decoder pass (memory bound).
    {doc_input_settings}
    invalid_cells
        Cells with fewer than 2 in-vocabulary counts: ``"raise"`` or ``"skip"`` (NaN rows).
    dtype
        dtype of the layer (``np.float16`` halves its memory).
    mod
        Modality of a MuData.
    device, progress_bar
        Where to compute; progress bar.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Sets

    ``.layers[key_added]``
        Dense ``cells x genes`` array of predicted log1p-normalised expression at the target
        depth. Columns of genes outside the model vocabulary, columns not in ``genes`` and
        rows of skipped cells are **NaN** (not predicted), never 0.
    ``.uns["scxtrimo"][key_added]``
        Model, target depth, number of filled genes (and their names when ``genes`` was
        given), genes outside the vocabulary, scxtrimo version.

    Examples
    --------
    >>> scxtrimo.tl.enhance(adata, model, target_depth="fold:10", genes=["CD3E", "MS4A1"])
    >>> sc.pl.umap(adata, color=["CD3E", "MS4A1"], layer="scxtrimo_enhanced")
    """
    if getattr(adata, "isbacked", False):
        raise ValueError(
            "enhance writes a dense layer, which a backed AnnData cannot hold; load the cells "
            "into memory (adata.to_memory()) or a subset of them."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    adata, target, net = start_tool(adata, model, mod=mod, copy=copy, device=device)
    settings = net.input_settings.merge(
        layer=layer,
        gene_symbols_key=gene_symbols_key,
        gene_ids_key=gene_ids_key,
        input_type=input_type,
        total_counts_key=total_counts_key,
    )
    # Validate everything (genes, cells) before the long decoder run.
    prep = net.prepare_input(
        target, input_settings=settings, target_depth=target_depth, invalid=invalid_cells
    )
    cols, unmapped = gene_columns(target, prep.mapping.col_to_vocab, genes)
    outside = [str(name) for name in target.var_names[unmapped]]
    from scxtrimo.data._vocabulary import load_vocabulary

    vocab = load_vocabulary()
    vocab_ids, position = np.unique(prep.mapping.col_to_vocab[cols], return_inverse=True)
    result = np.full(target.shape, np.nan, dtype=dtype)
    if cols.size and prep.cells.size:
        chunks = iter_decoder(
            net.module,
            prep,
            output="expression",
            genes=list(vocab.symbols[vocab_ids]),
            batch_size=batch_size,
            device=device,
            progress_bar=progress_bar,
        )
        for cells, values in chunks:
            result[np.ix_(cells, cols)] = values[:, position]
    target.layers[key_added] = result
    info = {
        "model": net.source_,
        "target_depth": prep.spec.target_depth.official(),
        "input_type": prep.spec.input_type,
        "scale": "log1p(x / total * 1e4)",
        "n_genes_filled": int(cols.size),
        "genes_outside_vocabulary": outside,
        **skipped_cells(target, prep.skipped),
    }
    if genes is not None:
        info["genes"] = [str(g) for g in target.var_names[cols]]
    record(target, key_added, info)
    return adata if copy else None
