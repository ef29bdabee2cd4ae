"""``scxtrimo.tl.gene_embeddings`` and ``context_gene_embeddings``: genes in embedding space."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from scxtrimo._docs import DOCS, doc_params
from scxtrimo.inference import InputSettings, iter_decoder

from ._common import gene_columns, record, skipped_cells, start_tool

if TYPE_CHECKING:
    from mudata import MuData

    from scxtrimo.data import GeneMapping
    from scxtrimo.model import XTrimoGene

logger = logging.getLogger("scxtrimo")


def gene_mapping(target: AnnData, settings: InputSettings) -> GeneMapping:
    """How ``target``'s genes map onto the vocabulary, read with the gene keys of ``settings``."""
    from scxtrimo.data._vocabulary import map_genes

    return map_genes(
        target.var,
        gene_symbols_key=settings.gene_symbols_key,
        gene_ids_key=settings.gene_ids_key,
    )


def gene_embeddings(
    adata: AnnData | MuData,
    model: XTrimoGene | str | os.PathLike | None = None,
    *,
    key_added: str = "scxtrimo_gene_embedding",
    gene_symbols_key: str | None = None,
    gene_ids_key: str | None = None,
    mod: str = "rna",
    copy: bool = False,
) -> AnnData | MuData | None:
    """Context-free gene embeddings (the model's gene-embedding table) for the AnnData's genes.

    Each gene of ``adata`` gets the row of the model's gene-embedding table for the
    vocabulary gene it maps to (the same mapping as for embedding cells); no cell is read.

    Parameters
    ----------
    adata
        Any AnnData (only ``.var`` is used). A MuData is handled through modality ``mod``.
    model
        An :class:`~scxtrimo.model.XTrimoGene`, a saved-model folder, ``models.ckpt``, or
        ``None`` for the shipped model.
    key_added
        ``.varm`` key.
    gene_symbols_key, gene_ids_key
        ``var`` columns with symbols / Ensembl IDs; default as the model was set up.
    mod
        Modality of a MuData.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Sets

    ``.varm[key_added]``
        ``float32`` array ``genes x encoder width``; NaN rows for genes outside the
        vocabulary.
    ``.uns["scxtrimo"][key_added]``
        Model, number of genes embedded, scxtrimo version.

    Examples
    --------
    >>> scxtrimo.tl.gene_embeddings(adata, model)
    >>> adata.varm["scxtrimo_gene_embedding"].shape
    """
    adata, target, net = start_tool(adata, model, mod=mod, copy=copy)
    settings = net.input_settings.merge(
        gene_symbols_key=gene_symbols_key, gene_ids_key=gene_ids_key
    )
    mapping = gene_mapping(target, settings)
    table = net.module.gene_embedding_table().detach().float().cpu().numpy()
    out = np.full((target.n_vars, table.shape[1]), np.nan, dtype=np.float32)
    mapped = mapping.col_to_vocab >= 0
    out[mapped] = table[mapping.col_to_vocab[mapped]]
    target.varm[key_added] = out
    record(
        target,
        key_added,
        {
            "kind": "table",
            "model": net.source_,
            "n_genes_embedded": int(mapped.sum()),
            "embedding_width": int(table.shape[1]),
        },
    )
    return adata if copy else None


def columns_for(
    target: AnnData, col_to_vocab: np.ndarray, genes: Sequence[str] | None
) -> np.ndarray:
    """Columns of ``genes`` (``var_names``) that map to the vocabulary, first of duplicates."""
    cols, outside = gene_columns(target, col_to_vocab, genes)
    if outside.size:
        logger.warning(
            "%d genes are not in the model vocabulary and are left out, e.g. %s.",
            outside.size,
            list(target.var_names[outside[:5]]),
        )
    # Several columns may map to one vocabulary gene: keep the first of each.
    _, first = np.unique(col_to_vocab[cols], return_index=True)
    return np.sort(cols[first])


def context_means(
    net: XTrimoGene,
    target: AnnData,
    cols: np.ndarray,
    col_to_vocab: np.ndarray,
    cells: np.ndarray,
    group_codes: np.ndarray,
    n_groups: int,
    *,
    prep,
    batch_size: int,
    device,
    progress_bar,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group mean of the cells' context gene embeddings: ``[groups, genes, d]``, counts.

    ``prep`` is the caller's checked input (target depth, skipped cells, input settings): the
    data are not scanned a second time.
    """
    from scxtrimo.data._vocabulary import load_vocabulary

    symbols = list(load_vocabulary().symbols[col_to_vocab[cols]])
    sums = np.zeros((n_groups, cols.size, net.config.decoder_dim), dtype=np.float64)
    counts = np.zeros(n_groups, dtype=np.int64)
    for chunk, emb in iter_decoder(
        net.module,
        prep.with_cells(cells),
        output="embeddings",
        genes=symbols,
        batch_size=batch_size,
        device=device,
        progress_bar=progress_bar,
    ):
        codes = group_codes[chunk]
        np.add.at(sums, codes, emb.astype(np.float64))
        counts += np.bincount(codes, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None, None]
    return means.astype(np.float32), counts


def sample_cells(codes: np.ndarray, n_groups: int, max_cells: int | None, seed: int) -> np.ndarray:
    """Up to ``max_cells`` random cells of each group (all when ``None``), sorted."""
    cells = np.flatnonzero(codes >= 0)
    if max_cells is None:
        return cells
    rng = np.random.default_rng(seed)
    keep = []
    for g in range(n_groups):
        members = cells[codes[cells] == g]
        if members.size > max_cells:
            members = rng.choice(members, max_cells, replace=False)
        keep.append(members)
    return np.sort(np.concatenate(keep)) if keep else cells


@doc_params(**DOCS)
def context_gene_embeddings(
    adata: AnnData | MuData,
    model: XTrimoGene | str | os.PathLike | None = None,
    *,
    genes: Sequence[str],
    groupby: str | None = None,
    key_added: str = "scxtrimo_context_gene_embedding",
    max_cells: int | None = 500,
    seed: int = 0,
    target_depth: float | str | None = None,
    batch_size: int = 4,
    layer: str | None = None,
    gene_symbols_key: str | None = None,
    gene_ids_key: str | None = None,
    input_type: Literal["counts", "log1p"] | None = None,
    total_counts_key: str | None = None,
    invalid_cells: Literal["raise", "skip"] = "skip",
    mod: str = "rna",
    device: str | None = None,
    progress_bar: bool | None = None,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Context-specific gene embeddings from the decoder, averaged over cells or cell groups.

    Every cell gives each gene an embedding that depends on the cell's expression
    (scFoundation's "gene" output: decoder states after the head LayerNorm). These are
    streamed ``batch_size`` cells at a time through
    :meth:`~scxtrimo.model.XTrimoGene.iter_gene_embeddings` and averaged, so memory stays at
    ``batch_size x genes x decoder width`` plus the sums.

    Parameters
    ----------
    adata
        Raw counts. A MuData is handled through modality ``mod``.
    model
        An :class:`~scxtrimo.model.XTrimoGene`, a saved-model folder, ``models.ckpt`` or
        ``None``. For the official weights use the ``"gene"`` sub-model
        (``XTrimoGene.from_scfoundation(path, checkpoint="gene")``).
    genes
        ``var_names`` to embed (genes outside the vocabulary are left out with a warning).
    groupby
        ``obs`` column: average per group (e.g. cell type) instead of over all cells; cells
        with a missing group are not used.
    key_added
        ``.varm`` key.
    max_cells
        Use at most this many randomly chosen cells per group (``None``: all).
    seed
        Seed of that choice.
    target_depth
        ``T``; ``None`` uses the model default.
    batch_size
        Cells per decoder pass.
    {doc_input_settings}
    invalid_cells
        Cells with < 2 in-vocabulary counts are ``"skip"``-ped (default) or ``"raise"``.
    mod
        Modality of a MuData.
    device, progress_bar
        Where to compute; progress bar.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Sets

    ``.varm[key_added]``
        Without ``groupby``: ``float32`` array ``genes x decoder width``, the mean over the
        cells. With ``groupby``: ``genes x groups x decoder width``, groups in the order of
        ``.uns["scxtrimo"][key_added]["groups"]``. Rows of genes not embedded are NaN (and a
        group without usable cells is NaN).
    ``.uns["scxtrimo"][key_added]``
        ``genes`` (embedded), ``groups`` and ``n_cells`` per group (with ``groupby``), model,
        target depth, scxtrimo version.

    Examples
    --------
    >>> markers = ["CD3E", "MS4A1", "LYZ", "NKG7"]
    >>> scxtrimo.tl.context_gene_embeddings(adata, model, genes=markers, groupby="cell_type")
    >>> adata[:, markers].varm["scxtrimo_context_gene_embedding"].shape  # (4, groups, d)
    """
    adata, target, net = start_tool(adata, model, mod=mod, copy=copy, device=device)
    settings = net.input_settings.merge(
        layer=layer,
        gene_symbols_key=gene_symbols_key,
        gene_ids_key=gene_ids_key,
        input_type=input_type,
        total_counts_key=total_counts_key,
    )
    prep = net.prepare_input(
        target, input_settings=settings, target_depth=target_depth, invalid=invalid_cells
    )
    col_to_vocab = prep.mapping.col_to_vocab
    cols = columns_for(target, col_to_vocab, genes)
    if groupby is None:
        groups, codes = ["all"], np.zeros(target.n_obs, dtype=np.int64)
    else:
        if groupby not in target.obs.columns:
            raise KeyError(f"groupby={groupby!r} is not a column of obs.")
        cat = pd.Categorical(target.obs[groupby])
        groups, codes = list(cat.categories), np.asarray(cat.codes, dtype=np.int64)
    valid = np.full(target.n_obs, -1, dtype=np.int64)
    valid[prep.cells] = codes[prep.cells]
    cells = sample_cells(valid, len(groups), max_cells, seed)
    if cols.size == 0 or cells.size == 0:
        raise ValueError("No gene of `genes` is in the vocabulary, or no cell can be used.")
    means, counts = context_means(
        net,
        target,
        cols,
        col_to_vocab,
        cells,
        valid,
        len(groups),
        prep=prep,
        batch_size=batch_size,
        device=device,
        progress_bar=progress_bar,
    )
    d = net.config.decoder_dim
    if groupby is None:
        out = np.full((target.n_vars, d), np.nan, dtype=np.float32)
        out[cols] = means[0]
    else:
        out = np.full((target.n_vars, len(groups), d), np.nan, dtype=np.float32)
        out[cols] = means.transpose(1, 0, 2)
    target.varm[key_added] = out
    info = {
        "kind": "context",
        "model": net.source_,
        "target_depth": prep.spec.target_depth.official(),
        "genes": [str(g) for g in target.var_names[cols]],
        "n_cells": [int(c) for c in counts],
        "max_cells": max_cells,
        **skipped_cells(target, prep.skipped),
    }
    if groupby is not None:
        info["groupby"] = groupby
        info["groups"] = [str(g) for g in groups]
    record(target, key_added, info)
    return adata if copy else None
