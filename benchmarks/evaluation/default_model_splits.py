"""The shipped default model's data: which cells it is pretrained on and which are held out.

One definition, imported by ``scripts/build_pretrained_default.py`` (pretraining) and
the evaluations (``evaluate_default_model.py``, ``evaluate_adaptation.py``: the same scored
cells, :func:`scored_cells`), so the evaluation parts can never leak into training. All four files of ``shared/data`` are used:

- pbmc4k (10x v2, 2,170 cells): a seeded 90% trains, 10% (217 cells) is held out;
- Kang 12k (8 donors, 1,287 genes): donors 1039 and 1244 are held out entirely;
- CellBench (5 lung cell lines): CEL-seq2 trains, Drop-seq is held out (cross-protocol);
- Kang IFN-beta (1,267 genes): its control cells train (they are Kang 12k cells of donors 101
  and 107 on another gene panel); the stimulated cells never do (the perturbation task's
  responses stay unseen).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SCXTRIMO_SHARED_DATA", ROOT.parent / "shared" / "data"))
PBMC4K = "pbmc4k_soupx_2170.h5ad"
KANG12K = "kang2018_pbmc_12k_1287genes.h5ad"
CELLBENCH = "cellbench_tian2019_lung_celllines.h5ad"
KANG_IFNB = "kang2018_ifnb_pbmc_1556.h5ad"
KANG_HELD_OUT_DONORS = ("donor1039", "donor1244")
CELLBENCH_TRAIN_TECHNOLOGY = "CEL-seq2"
PBMC4K_HELD_OUT_SHARE = 0.1
SPLIT_SEED = 0

#: pbmc4k labels -> Kang labels for cross-study transfer (shared cell types only).
PBMC4K_TO_KANG = {
    "T_CD4": "CD4 T cells",
    "T_CD8": "CD8 T cells",
    "B": "B cells",
    "NK": "NK cells",
    "MNP": "Monocytes/DC",
}
KANG_TO_SHARED = {
    "CD4 T cells": "CD4 T cells",
    "CD8 T cells": "CD8 T cells",
    "B cells": "B cells",
    "NK cells": "NK cells",
    "CD14+ Monocytes": "Monocytes/DC",
    "FCGR3A+ Monocytes": "Monocytes/DC",
    "Dendritic cells": "Monocytes/DC",
}


@dataclass(frozen=True)
class Split:
    """One file with its training and held-out rows."""

    name: str
    adata: ad.AnnData
    train: np.ndarray
    held_out: np.ndarray


def data_dir(path: Path | None = None) -> Path:
    """The shared data folder (``--data`` overrides it)."""
    folder = Path(path) if path is not None else DATA
    if not (folder / PBMC4K).is_file():
        raise FileNotFoundError(f"{folder} does not hold the shared data ({PBMC4K} is missing).")
    return folder


def pbmc4k_split(folder: Path) -> Split:
    """pbmc4k: a seeded 10% of the cells held out."""
    adata = ad.read_h5ad(folder / PBMC4K)
    order = np.random.default_rng(SPLIT_SEED).permutation(adata.n_obs)
    n_held = round(PBMC4K_HELD_OUT_SHARE * adata.n_obs)
    return Split("pbmc4k", adata, np.sort(order[n_held:]), np.sort(order[:n_held]))


def kang_split(folder: Path) -> Split:
    """Kang 12k: two donors held out entirely."""
    adata = ad.read_h5ad(folder / KANG12K)
    held = adata.obs["batch"].isin(KANG_HELD_OUT_DONORS).to_numpy()
    return Split("kang12k", adata, np.flatnonzero(~held), np.flatnonzero(held))


def cellbench_split(folder: Path) -> Split:
    """CellBench: one protocol trains, the other is held out."""
    adata = ad.read_h5ad(folder / CELLBENCH)
    train = (adata.obs["technology"] == CELLBENCH_TRAIN_TECHNOLOGY).to_numpy()
    return Split("cellbench", adata, np.flatnonzero(train), np.flatnonzero(~train))


def kang_ifnb_split(folder: Path) -> Split:
    """Kang IFN-beta: control cells train, stimulated cells are never used."""
    adata = ad.read_h5ad(folder / KANG_IFNB)
    ctrl = (adata.obs["condition"] == "ctrl").to_numpy()
    return Split("kang_ifnb", adata, np.flatnonzero(ctrl), np.flatnonzero(~ctrl))


def all_splits(folder: Path | None = None) -> dict[str, Split]:
    """Every file's split, keyed by name."""
    folder = data_dir(folder)
    splits = [pbmc4k_split(folder), kang_split(folder), cellbench_split(folder)]
    splits.append(kang_ifnb_split(folder))
    return {s.name: s for s in splits}


def training_corpus(
    splits: dict[str, Split], studies: tuple[str, ...] | None = None
) -> list[ad.AnnData]:
    """The pretraining corpus: the training rows of each study (views, nothing copied)."""
    names = studies or tuple(splits)
    return [splits[n].adata[splits[n].train] for n in names]


#: Cells scored per split (seeded draws): classifier reference and held-out query.
MAX_REFERENCE = 2000
MAX_QUERY = 1500


@dataclass(frozen=True)
class ScoredCells:
    """The cells an evaluation scores on one split: reference rows (classifier training) and
    held-out query rows of ``adata``, with their labels."""

    name: str
    adata: ad.AnnData
    labels: np.ndarray
    reference: np.ndarray
    query: np.ndarray


def scored_cells(splits: dict[str, Split]) -> list[ScoredCells]:
    """The evaluated cells of every split, one seeded draw shared by all evaluation scripts.

    pbmc4k, Kang 12k and CellBench: labelled training rows as the reference and held-out rows
    as the query (at most :data:`MAX_REFERENCE` / :data:`MAX_QUERY`). Cross-study "pbmc4k ->
    Kang": pbmc4k's training rows -> Kang's held-out donors, on their common genes and shared
    cell types (``PBMC4K_TO_KANG``, ``KANG_TO_SHARED``), in one AnnData.
    """
    rng = np.random.default_rng(0)
    out = []
    for name in ("pbmc4k", "kang12k", "cellbench"):
        s = splits[name]
        labels = s.adata.obs["cell_type"].astype(str).to_numpy()
        known = labels != "?"  # pbmc4k's unassigned cells are not scored
        ref, query = s.train[known[s.train]], s.held_out[known[s.held_out]]
        if len(ref) > MAX_REFERENCE:
            ref = np.sort(rng.choice(ref, MAX_REFERENCE, replace=False))
        if len(query) > MAX_QUERY:
            query = np.sort(rng.choice(query, MAX_QUERY, replace=False))
        out.append(ScoredCells(name, s.adata, labels, ref, query))
    pbmc, kang = splits["pbmc4k"], splits["kang12k"]
    common = pbmc.adata.var_names.intersection(kang.adata.var_names)
    p_lab = pbmc.adata.obs["cell_type"].astype(str).map(PBMC4K_TO_KANG)
    k_lab = kang.adata.obs["cell_type"].astype(str).map(KANG_TO_SHARED)
    p_rows = pbmc.train[p_lab.iloc[pbmc.train].notna().to_numpy()]
    k_rows = kang.held_out[k_lab.iloc[kang.held_out].notna().to_numpy()]
    if len(k_rows) > MAX_QUERY:
        k_rows = np.sort(rng.choice(k_rows, MAX_QUERY, replace=False))
    joint = ad.concat(
        [pbmc.adata[p_rows, common], kang.adata[k_rows, common]], join="inner", index_unique="-"
    )
    labels = np.concatenate([p_lab.iloc[p_rows], k_lab.iloc[k_rows]]).astype(str)
    n_p = len(p_rows)
    out.append(
        ScoredCells("pbmc4k -> Kang", joint, labels, np.arange(n_p), np.arange(n_p, joint.n_obs))
    )
    return out
