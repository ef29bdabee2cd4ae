"""``scxtrimo.tl.gene_modules`` and ``cluster_genes``: genes clustered by their embeddings."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from scxtrimo._docs import DOCS, doc_params

from ._common import record, start_tool
from ._gene_embeddings import columns_for, context_means, gene_mapping, sample_cells

if TYPE_CHECKING:
    from mudata import MuData

    from scxtrimo.model import XTrimoGene


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


@doc_params(**DOCS)
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
    invalid_cells: Literal["raise", "skip"] = "skip",
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
    target_depth, batch_size
        How to decode the cells for ``use="context"``; see :func:`scxtrimo.tl.embed`.
    {doc_input_settings}
    invalid_cells
        ``use="context"``: cells with fewer than 2 in-vocabulary counts are ``"skip"``-ped
        (default: they are not averaged over) or ``"raise"`` an error naming them, before
        any work.
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
    adata, target, net = start_tool(adata, model, mod=mod, copy=copy, device=device)
    settings = net.input_settings.merge(
        layer=layer,
        gene_symbols_key=gene_symbols_key,
        gene_ids_key=gene_ids_key,
        input_type=input_type,
        total_counts_key=total_counts_key,
    )
    mapping = gene_mapping(target, settings)
    col_to_vocab = mapping.col_to_vocab
    if genes is None:
        from scxtrimo.data._matrix import get_matrix

        matrix = get_matrix(target, settings.layer)
        cols = columns_for(
            target,
            col_to_vocab,
            list(target.var_names[_default_genes(target, col_to_vocab, matrix, n_top_genes)]),
        )
    else:
        cols = columns_for(target, col_to_vocab, genes)
    if cols.size < 3:
        raise ValueError(f"Need at least 3 genes in the vocabulary to cluster, got {cols.size}.")
    n_cells_used = None
    if use == "table":
        table = net.module.gene_embedding_table().detach().float().cpu().numpy()
        emb = table[col_to_vocab[cols]]
    else:
        prep = net.prepare_input(
            target, input_settings=settings, target_depth=target_depth, invalid=invalid_cells
        )
        codes = np.full(target.n_obs, -1, dtype=np.int64)
        codes[prep.cells] = 0
        cells = sample_cells(codes, 1, max_cells, seed)
        means, counts = context_means(
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
