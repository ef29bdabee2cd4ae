"""``scxtrimo.tl.embed``: cell embeddings into ``.obsm``, scanpy style."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import numpy as np
from anndata import AnnData

from scxtrimo._docs import DOCS, doc_params
from scxtrimo.inference import embed_prepared

from ._common import record, skipped_cells, start_tool

if TYPE_CHECKING:
    from mudata import MuData

    from scxtrimo.model import XTrimoGene

__all__ = ["embed"]


@doc_params(**DOCS)
def embed(
    adata: AnnData | MuData,
    model: XTrimoGene | str | os.PathLike | None = None,
    *,
    key_added: str = "X_scxtrimo",
    layer: str | None = None,
    gene_symbols_key: str | None = None,
    gene_ids_key: str | None = None,
    input_type: Literal["counts", "log1p", "bulk"] | None = None,
    total_counts_key: str | None = None,
    batch_size: int | None = None,
    max_tokens: int = 16_384,
    max_genes: int | Literal["all"] | None = None,
    pooling: Literal["all", "max", "mean"] = "all",
    target_depth: float | str | None = None,
    invalid_cells: Literal["raise", "skip"] = "raise",
    precision: Literal["fp32", "bf16", "int8"] = "fp32",
    mod: str = "rna",
    device: str | None = None,
    progress_bar: bool | None = None,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Embed cells with an xTrimoGene / scFoundation model.

    Writes the cell embeddings to ``.obsm[key_added]`` and the parameters and gene-overlap
    report to ``.uns["scxtrimo"][key_added]``; nothing else of ``adata`` is changed. Use the
    embedding like a PCA: ``sc.pp.neighbors(adata, use_rep="X_scxtrimo")``.

    Parameters
    ----------
    adata
        Raw counts (in ``.X`` or ``layer``); in memory or backed (``backed="r"``, read in
        chunks). A :class:`~mudata.MuData` is embedded through its modality ``mod`` and the
        result is also written to ``mdata.obsm[key_added]``.
    model
        An :class:`~scxtrimo.model.XTrimoGene`, a saved-model directory, the official
        scFoundation ``models.ckpt``, or ``None`` for the pretrained model shipped with
        scxtrimo.
    key_added
        Key in ``.obsm`` (and in ``.uns["scxtrimo"]``).
    {doc_input_settings}
    batch_size
        Maximum cells per batch; ``None`` lets ``max_tokens`` decide.
    max_tokens
        Token budget per batch; bounds memory whatever the cells' depth.
    max_genes
        Cap on gene tokens per cell (highest values kept); ``None`` uses the model's
        :attr:`~scxtrimo.model.XTrimoGene.default_max_genes` (the cap it was pretrained with;
        none for scFoundation weights), ``"all"`` keeps every gene.
    pooling
        ``"all"``, ``"max"`` or ``"mean"``; see
        :meth:`~scxtrimo.model.XTrimoGene.get_latent_representation`.
    target_depth
        The target read depth T (e.g. ``4.0``, ``"t4"``, ``"fold:2"``, ``"add:1"``); ``None``
        uses the model's default.
    invalid_cells
        Cells with fewer than 2 in-vocabulary counts: ``"raise"`` (an error naming them,
        before any work) or ``"skip"`` (NaN rows; a warning names the first few, and
        ``.uns["scxtrimo"][key_added]["skipped_cells"]`` lists them all).
    precision
        ``"fp32"`` (default); ``"bf16"`` (autocast, CPU with AVX512-BF16/AMX, or CUDA);
        ``"int8"`` (CPU: the encoder's linear layers in int8 with dynamically quantised
        activations, on a copy of the model; the model is not changed). See
        :doc:`/performance` for speed and fidelity; refused with a clear error where the
        hardware lacks it.
    mod
        Modality to embed when ``adata`` is a MuData.
    device
        ``"cpu"``, ``"cuda"``...; default ``scxtrimo.settings.device``.
    progress_bar
        Show a progress bar (default ``scxtrimo.settings.progress_bar``).
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Sets

    ``.obsm[key_added]``
        ``float32`` array, cells x embedding width.
    ``.uns["scxtrimo"][key_added]``
        Model, pooling, precision, target depth, input settings, scxtrimo version, gene
        overlap, and the skipped cells (``n_skipped_cells``, ``skipped_cells``).

    Examples
    --------
    >>> import scanpy as sc
    >>> import scxtrimo
    >>> adata = scxtrimo.datasets.pbmc4k()
    >>> scxtrimo.tl.embed(adata)
    >>> sc.pp.neighbors(adata, use_rep="X_scxtrimo")
    >>> sc.tl.umap(adata)
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
        target,
        input_settings=settings,
        target_depth=target_depth,
        max_genes=max_genes,
        invalid=invalid_cells,
    )
    emb = embed_prepared(
        net.module,
        prep,
        batch_size=batch_size,
        pooling=pooling,
        max_tokens=max_tokens,
        device=device,
        progress_bar=progress_bar,
        precision=precision,
    )
    target.obsm[key_added] = emb
    params = {
        "model": net.source_,
        "model_config": getattr(net.config, "name", None) or "custom",
        "pooling": pooling,
        "precision": precision,
        "target_depth": prep.spec.target_depth.official(),
        "max_genes": prep.spec.max_genes,
        "input_type": prep.spec.input_type,
        "layer": settings.layer,
        **skipped_cells(target, prep.skipped),
        "embedding_width": int(emb.shape[1]),
        "gene_overlap": prep.mapping.summary(prep.stats.count_fraction),
    }
    record(target, key_added, params)
    if target is not adata:  # MuData: also where scverse tools look for joint embeddings
        adata.obsm[key_added] = _expand_to_mudata(adata, target, emb, mod)
    return adata if copy else None


def _expand_to_mudata(mdata: MuData, target: AnnData, emb: np.ndarray, mod: str) -> np.ndarray:
    """Rows of ``emb`` placed at the MuData observations of modality ``mod`` (NaN elsewhere)."""
    out = np.full((mdata.n_obs, emb.shape[1]), np.nan, dtype=emb.dtype)
    where = mdata.obsmap[mod]  # 1-based row in the modality, 0 where absent
    present = where > 0
    out[present] = emb[where[present] - 1]
    return out
