"""Rebuild the data files shipped inside the package from ``../shared/data``.

Run from the repository root: ``python scripts/build_package_data.py``. It writes
``src/scxtrimo/datasets/pbmc4k.h5ad`` (pbmc4k restricted to vocabulary genes with at least one
count) and ``src/scxtrimo/_resources/vocabulary_ensembl.tsv`` (Ensembl IDs of vocabulary
symbols from the 10x GRCh38 and GENCODE v44 gene tables of the shared datasets).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    """Write the Ensembl table and the packaged pbmc4k subset."""
    vocab = pd.read_csv(ROOT / "src/scxtrimo/_resources/OS_scRNA_gene_index.19264.tsv", sep="\t")
    symbols = set(vocab["gene_name"])

    pbmc = ad.read_h5ad(SHARED / "pbmc4k_soupx_2170.h5ad")
    cellbench = ad.read_h5ad(SHARED / "cellbench_tian2019_lung_celllines.h5ad", backed="r")
    rows = []
    for sym, gid in zip(pbmc.var_names, pbmc.var["gene_ids"]):
        base = re.sub(r"\.\d+$", "", sym)  # R's make.unique suffix on duplicated symbols
        if base in symbols:
            rows.append((gid, base, "10x_GRCh38_1.2.0"))
    for sym, gid, src in zip(
        cellbench.var_names, cellbench.var["gene_ids"], cellbench.var["symbol_source"]
    ):
        if sym in symbols and src != "unmapped":
            rows.append((gid, sym, src))
    table = pd.DataFrame(rows, columns=["ensembl_id", "gene_name", "source"])
    table = table.drop_duplicates("ensembl_id", keep="first").sort_values("ensembl_id")
    table.to_csv(ROOT / "src/scxtrimo/_resources/vocabulary_ensembl.tsv", sep="\t", index=False)

    detected = np.asarray((pbmc.X > 0).sum(axis=0)).ravel() > 0
    keep = pbmc.var_names.isin(symbols) & detected
    small = pbmc[:, keep].copy()
    small.X = small.X.astype(np.int32)
    small.uns["provenance"] = {
        "source": "10x Genomics '4k PBMCs from a Healthy Donor' (Chromium 3' v2, Cell Ranger "
        "2.1.0, GRCh38), CC BY 4.0; 50% of cells and the cluster annotation from the SoupX "
        "package (Young & Behjati, GigaScience 2020)",
        "processing": "raw UMI counts; genes restricted to scFoundation-vocabulary symbols "
        f"detected in >= 1 cell ({int(keep.sum())} of {pbmc.n_vars})",
    }
    small.write_h5ad(ROOT / "src/scxtrimo/datasets/pbmc4k.h5ad", compression="gzip")
    print(small, file=sys.stderr)


if __name__ == "__main__":
    main()
