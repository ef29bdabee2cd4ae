"""Gene embeddings (context-free and per cell context) and gene modules."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from ._common import gene_columns, record, setup_overrides, start_tool

if TYPE_CHECKING:
    from mudata import MuData

    from scxtrimo.model import XTrimoGene

logger = logging.getLogger("scxtrimo")


def _mapping(net, target: AnnData, gene_symbols_key, gene_ids_key):
    from scxtrimo.data._vocabulary import map_genes

    args = net.setup_args
    return map_genes(
        target.var,
        gene_symbols_key=gene_symbols_key or args["gene_symbols_key"],
        gene_ids_key=gene_ids_key or args["gene_ids_key"],
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
    mapping = _mapping(net, target, gene_symbols_key, gene_ids_key)
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


def _columns_for(
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


def _context_means(
    net,
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
    for chunk, emb in net._iter_decoder(
        target,
        cells,
        output="embeddings",
        genes=symbols,
        batch_size=batch_size,
        device=device,
        progress_bar=progress_bar,
        prep=prep,
    ):
        codes = group_codes[chunk]
        np.add.at(sums, codes, emb.astype(np.float64))
        counts += np.bincount(codes, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None, None]
    return means.astype(np.float32), counts


def _sample_cells(codes: np.ndarray, n_groups: int, max_cells: int | None, seed: int) -> np.ndarray:
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
    layer, gene_symbols_key, gene_ids_key, input_type, total_counts_key
        How to read the cells; see :func:`scxtrimo.tl.embed`.
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
    overrides = setup_overrides(layer, gene_symbols_key, gene_ids_key, input_type, total_counts_key)
    adata, target, net = start_tool(adata, model, mod=mod, copy=copy, device=device)
    prep = net.prepare_input(target, target_depth=target_depth, invalid=invalid_cells, **overrides)
    col_to_vocab = prep.mapping.col_to_vocab
    cols = _columns_for(target, col_to_vocab, genes)
    if groupby is None:
        groups, codes = ["all"], np.zeros(target.n_obs, dtype=np.int64)
    else:
        if groupby not in target.obs.columns:
            raise KeyError(f"groupby={groupby!r} is not a column of obs.")
        cat = pd.Categorical(target.obs[groupby])
        groups, codes = list(cat.categories), np.asarray(cat.codes, dtype=np.int64)
    valid = np.full(target.n_obs, -1, dtype=np.int64)
    valid[prep.cells] = codes[prep.cells]
    cells = _sample_cells(valid, len(groups), max_cells, seed)
    if cols.size == 0 or cells.size == 0:
        raise ValueError("No gene of `genes` is in the vocabulary, or no cell can be used.")
    means, counts = _context_means(
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
    }
    if groupby is not None:
        info["groupby"] = groupby
        info["groups"] = [str(g) for g in groups]
    record(target, key_added, info)
    return adata if copy else None


def _default_genes(target: AnnData, col_to_vocab: np.ndarray, matrix, n_top: int) -> np.ndarray:
    """``highly_variable`` genes if marked, else the ``n_top`` most often detected genes."""
    if "highly_variable" in target.var.columns:
        cols = np.flatnonzero(target.var["highly_variable"].to_numpy(dtype=bool))
        return cols[col_to_vocab[cols] >= 0]
    import scipy.sparse as sp

    detected = (
        np.asarray((matrix > 0).sum(axis=0)).ravel()
        if sp.issparse(matrix)
        else (np.asarray(matrix) > 0).sum(axis=0)
    )
    detected = np.where(col_to_vocab >= 0, detected, -1)
    order = np.argsort(-detected, kind="stable")[:n_top]
    return np.sort(order[detected[order] > 0])


def cluster_genes(
    embedding: np.ndarray,
    *,
    method: Literal["leiden", "hierarchical"] = "leiden",
    n_modules: int | None = None,
    resolution: float = 1.0,
    n_neighbors: int = 15,
    seed: int = 0,
) -> np.ndarray:
    """Cluster genes by the cosine similarity of their embeddings.

    Parameters
    ----------
    embedding
        Genes x dimensions.
    method
        ``"leiden"``: Leiden (igraph, through scanpy) on the genes' symmetric kNN graph,
        edges weighted by cosine similarity;
        ``"hierarchical"``: average-linkage clustering of cosine distances, cut into
        ``n_modules`` clusters.
    n_modules
        Number of modules (``"hierarchical"`` only).
    resolution
        Leiden resolution (higher: more, smaller modules).
    n_neighbors
        Neighbours of the gene graph (``"leiden"``).
    seed
        Leiden seed.

    Returns
    -------
    ``int64`` module of each gene, numbered by decreasing size from 0.
    """
    x = np.asarray(embedding, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method == "hierarchical":
        from scipy.cluster.hierarchy import fcluster, linkage

        if n_modules is None or n_modules < 1:
            raise ValueError("method='hierarchical' needs n_modules >= 1.")
        labels = fcluster(linkage(x, method="average", metric="cosine"), n_modules, "maxclust")
    elif method == "leiden":
        import scanpy as sc
        import scipy.sparse as sp
        from sklearn.neighbors import NearestNeighbors

        # Symmetric kNN graph weighted by cosine similarity (negative similarities dropped).
        k = min(n_neighbors, x.shape[0] - 1)
        dist, ind = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(x).kneighbors(x)
        weight = np.clip(1.0 - dist[:, 1:], 1e-6, None).ravel()
        rows = np.repeat(np.arange(x.shape[0]), k)
        adjacency = sp.csr_matrix((weight, (rows, ind[:, 1:].ravel())), shape=(len(x),) * 2)
        adjacency = adjacency.maximum(adjacency.T).tocsr()
        graph = AnnData(np.zeros((x.shape[0], 0), dtype=np.float32))
        sc.tl.leiden(
            graph,
            resolution=resolution,
            random_state=seed,
            adjacency=adjacency,
            flavor="igraph",
            n_iterations=2,
            directed=False,
        )
        labels = graph.obs["leiden"].astype(int).to_numpy()
    else:
        raise ValueError(f"method must be 'leiden' or 'hierarchical', not {method!r}.")
    # Renumber by decreasing size (ties: by first gene), so module 0 is the largest.
    uniq, counts = np.unique(labels, return_counts=True)
    order = uniq[np.argsort(-counts, kind="stable")]
    rank = {old: new for new, old in enumerate(order)}
    return np.array([rank[v] for v in labels], dtype=np.int64)


def gene_modules(
    adata: AnnData | MuData,
    model: XTrimoGene | str | os.PathLike | None = None,
    *,
    genes: Sequence[str] | None = None,
    n_modules: int | None = None,
    resolution: float = 1.0,
    use: Literal["context", "table"] = "context",
    method: Literal["leiden", "hierarchical"] | None = None,
    n_neighbors: int = 15,
    n_top_genes: int = 2000,
    max_cells: int | None = 300,
    seed: int = 0,
    key_added: str = "scxtrimo_module",
    target_depth: float | str | None = None,
    batch_size: int = 4,
    layer: str | None = None,
    gene_symbols_key: str | None = None,
    gene_ids_key: str | None = None,
    input_type: Literal["counts", "log1p"] | None = None,
    total_counts_key: str | None = None,
    mod: str = "rna",
    device: str | None = None,
    progress_bar: bool | None = None,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Group genes into modules by the cosine similarity of their scxtrimo embeddings.

    Parameters
    ----------
    adata
        Raw counts (cells are read only for ``use="context"``). MuData: modality ``mod``.
    model
        An :class:`~scxtrimo.model.XTrimoGene`, a saved-model folder, ``models.ckpt`` or
        ``None``.
    genes
        ``var_names`` to cluster. ``None``: ``var["highly_variable"]`` when present, else
        the ``n_top_genes`` genes detected in the most cells. Genes outside the vocabulary are
        left out.
    n_modules
        Number of modules; given, the clustering is hierarchical (average linkage on cosine
        distance) unless ``method="leiden"``.
    resolution
        Leiden resolution (when ``n_modules`` is not given).
    use
        ``"context"`` (default): each gene's decoder embedding averaged over up to
        ``max_cells`` cells of ``adata`` (see :func:`context_gene_embeddings`);
        ``"table"``: the context-free gene-embedding table (no cell is read).
    method
        ``"leiden"`` or ``"hierarchical"``; default hierarchical when ``n_modules`` is given,
        else Leiden.
    n_neighbors
        Neighbours of the Leiden gene graph.
    n_top_genes
        Size of the default gene set without ``highly_variable``.
    max_cells
        Cells averaged over for ``use="context"`` (random, ``seed``); ``None``: all.
    seed
        Seed of the cell choice and of Leiden.
    key_added
        ``.var`` column (and ``.uns["scxtrimo"]`` key).
    target_depth, batch_size, layer, gene_symbols_key, gene_ids_key, input_type, total_counts_key
        How to read the cells for ``use="context"``; see :func:`scxtrimo.tl.embed`.
    mod
        Modality of a MuData.
    device, progress_bar
        Where to compute; progress bar.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Sets

    ``.var[key_added]``
        Categorical module (``"0"`` = the largest); NaN for genes not clustered.
    ``.uns["scxtrimo"][key_added]``
        Parameters, ``genes`` (clustered, in column order), ``embedding`` (their L2-normalised
        embeddings, ``float32`` ``genes x d``, for :func:`scxtrimo.pl.gene_module_heatmap`),
        ``module_sizes``, scxtrimo version.

    Examples
    --------
    >>> sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=1000)
    >>> scxtrimo.tl.gene_modules(adata, model, use="context", resolution=1.0)
    >>> scxtrimo.pl.gene_module_heatmap(adata)
    """
    if use not in ("context", "table"):
        raise ValueError(f"use must be 'context' or 'table', not {use!r}.")
    method = method or ("hierarchical" if n_modules is not None else "leiden")
    overrides = setup_overrides(layer, gene_symbols_key, gene_ids_key, input_type, total_counts_key)
    adata, target, net = start_tool(adata, model, mod=mod, copy=copy, device=device)
    mapping = _mapping(net, target, gene_symbols_key, gene_ids_key)
    col_to_vocab = mapping.col_to_vocab
    if genes is None:
        from scxtrimo.data._matrix import get_matrix

        matrix = get_matrix(target, layer if layer is not None else net.setup_args["layer"])
        cols = _columns_for(
            target,
            col_to_vocab,
            list(target.var_names[_default_genes(target, col_to_vocab, matrix, n_top_genes)]),
        )
    else:
        cols = _columns_for(target, col_to_vocab, genes)
    if cols.size < 3:
        raise ValueError(f"Need at least 3 genes in the vocabulary to cluster, got {cols.size}.")
    n_cells_used = None
    if use == "table":
        table = net.module.gene_embedding_table().detach().float().cpu().numpy()
        emb = table[col_to_vocab[cols]]
    else:
        prep = net.prepare_input(target, target_depth=target_depth, invalid="skip", **overrides)
        codes = np.full(target.n_obs, -1, dtype=np.int64)
        codes[prep.cells] = 0
        cells = _sample_cells(codes, 1, max_cells, seed)
        means, counts = _context_means(
            net,
            target,
            cols,
            prep.mapping.col_to_vocab,
            cells,
            codes,
            1,
            prep=prep,
            batch_size=batch_size,
            device=device,
            progress_bar=progress_bar,
        )
        emb, n_cells_used = means[0], int(counts[0])
    labels = cluster_genes(
        emb,
        method=method,
        n_modules=n_modules,
        resolution=resolution,
        n_neighbors=n_neighbors,
        seed=seed,
    )
    n_found = int(labels.max()) + 1
    modules = np.full(target.n_vars, -1, dtype=np.int64)
    modules[cols] = labels
    target.var[key_added] = pd.Categorical.from_codes(
        modules, categories=[str(i) for i in range(n_found)]
    )
    normed = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    record(
        target,
        key_added,
        {
            "use": use,
            "method": method,
            "n_modules": n_found,
            "resolution": resolution if method == "leiden" else None,
            "n_neighbors": n_neighbors if method == "leiden" else None,
            "model": net.source_,
            "n_cells": n_cells_used,
            "genes": [str(g) for g in target.var_names[cols]],
            "embedding": normed.astype(np.float32),
            "module_sizes": np.bincount(labels, minlength=n_found).astype(np.int64),
        },
    )
    return adata if copy else None
