"""Loaders for the datasets inside the package."""

from __future__ import annotations

from importlib.resources import as_file, files

import anndata as ad


def pbmc4k() -> ad.AnnData:
    """2,170 human PBMCs (10x Genomics "4k PBMCs from a Healthy Donor", Chromium 3' v2).

    Raw UMI counts (``int32`` CSR) of the genes of the scFoundation vocabulary detected in at
    least one cell, with cluster-level cell-type labels from the SoupX package
    (Young & Behjati, GigaScience 2020).

    Returns
    -------
    AnnData with ``.X`` raw counts, ``var_names`` gene symbols, ``var["gene_ids"]`` Ensembl
    IDs, ``obs["cell_type"]`` (``T_CD4``, ``MNP``, ``T_CD8``, ``B``, ``NK``, ``?``),
    ``obs["cluster"]`` and ``obs["batch"]``. The original has 33,694 genes and 10x's
    CC BY 4.0 licence; ``.uns["provenance"]`` records where it comes from.
    """
    with as_file(files("scxtrimo.datasets") / "pbmc4k.h5ad") as path:
        return ad.read_h5ad(path)
