"""``scxtrimo demo``: the main job, end to end on real PBMCs, offline."""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

logger = logging.getLogger("scxtrimo")


def _get_model(args: argparse.Namespace, adata):
    from .model import XTrimoGene, resolve_model
    from .model._pretrained import default_model_available

    if args.model is not None:
        return resolve_model(args.model), f"given ({args.model})"
    if not args.pretrain and default_model_available():
        return resolve_model(None), "shipped pretrained default"
    if args.pretrain:
        print(
            f"scxtrimo demo: pretraining a fresh {args.config!r} model on these cells for "
            f"{args.max_epochs} epoch(s) on the CPU (the shipped model's recipe)."
        )
    else:
        print(
            "scxtrimo demo: this installation has no shipped pretrained model; pretraining a "
            f"{args.config!r} model on these cells for {args.max_epochs} epoch(s) on the CPU."
        )
    train = adata.copy()
    XTrimoGene.setup_anndata(train)
    model = XTrimoGene(train, config=args.config, seed=args.seed)
    start = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs,
        batch_size=16,
        lr=1e-3,
        seed=args.seed,
        max_genes=args.max_genes,
    )
    minutes = (time.perf_counter() - start) / 60
    return (
        model,
        f"pretrained here: config {args.config!r}, {args.max_epochs} epochs, {minutes:.1f} min",
    )


def run_demo(args: argparse.Namespace) -> dict:
    """Embed the shipped PBMCs, compare with PCA by kNN accuracy, write h5ad + UMAP PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from . import datasets, metrics, tl

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    adata = datasets.pbmc4k()
    if args.max_cells is not None and args.max_cells < adata.n_obs:
        rng = np.random.default_rng(args.seed)
        adata = adata[np.sort(rng.choice(adata.n_obs, args.max_cells, replace=False))].copy()
    model, how = _get_model(args, adata)

    start = time.perf_counter()
    tl.embed(adata, model)
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    adata.obsm["X_pca"] = metrics.pca_baseline(adata)
    pca_s = time.perf_counter() - start
    adapt_s = None
    if not args.no_adapt:
        start = time.perf_counter()
        adapted = tl.adapt(adata, model, seed=args.seed)
        tl.embed(adata, adapted, key_added="X_scxtrimo_adapted")
        adapt_s = time.perf_counter() - start

    labelled = (adata.obs["cell_type"] != "?").to_numpy()
    labels = adata.obs["cell_type"].to_numpy()[labelled]
    knn_model = metrics.knn_accuracy(adata.obsm["X_scxtrimo"][labelled], labels, k=15)
    knn_pca = metrics.knn_accuracy(adata.obsm["X_pca"][labelled], labels, k=15)
    knn_adapted = None
    if adapt_s is not None:
        knn_adapted = metrics.knn_accuracy(adata.obsm["X_scxtrimo_adapted"][labelled], labels, k=15)
    shown = "X_scxtrimo" if adapt_s is None else "X_scxtrimo_adapted"

    sc.pp.neighbors(adata, use_rep=shown, random_state=args.seed)
    sc.tl.umap(adata, random_state=args.seed)
    fig, ax = plt.subplots(figsize=(6, 5))
    title = "PBMC 4k: scxtrimo " + ("embedding" if adapt_s is None else "adapted embedding")
    sc.pl.umap(adata, color="cell_type", ax=ax, show=False, title=title)
    png = out / "pbmc4k_scxtrimo_umap.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    h5ad = out / "pbmc4k_scxtrimo.h5ad"
    adata.write_h5ad(h5ad)

    report = {
        "cells": int(adata.n_obs),
        "model": how,
        "embedding_shape": list(adata.obsm["X_scxtrimo"].shape),
        "embed_seconds": round(embed_s, 2),
        "cells_per_second": round(adata.n_obs / embed_s, 1),
        "knn15_5fold_accuracy_scxtrimo": round(knn_model["accuracy"], 4),
        "knn15_5fold_accuracy_pca50": round(knn_pca["accuracy"], 4),
        "knn15_5fold_macro_f1_scxtrimo": round(knn_model["macro_f1"], 4),
        "knn15_5fold_macro_f1_pca50": round(knn_pca["macro_f1"], 4),
        "pca_seconds": round(pca_s, 2),
        "adapt_and_embed_seconds": None if adapt_s is None else round(adapt_s, 2),
        "knn15_5fold_accuracy_adapted": None
        if knn_adapted is None
        else round(knn_adapted["accuracy"], 4),
        "knn15_5fold_macro_f1_adapted": None
        if knn_adapted is None
        else round(knn_adapted["macro_f1"], 4),
        "gene_overlap": adata.uns["scxtrimo"]["X_scxtrimo"]["gene_overlap"],
        "h5ad": str(h5ad),
        "umap_png": str(png),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print("scxtrimo demo: PBMC 4k (real 10x data shipped with scxtrimo)")
    print(f"  model:            {how}")
    print(
        f"  embedded:         {report['cells']} cells -> {tuple(report['embedding_shape'])} in {embed_s:.1f} s"
    )
    print(
        f"  kNN (k=15, 5-fold) cell-type accuracy: scxtrimo {knn_model['accuracy']:.3f} "
        f"(macro-F1 {knn_model['macro_f1']:.3f}) | scanpy PCA-50 {knn_pca['accuracy']:.3f} "
        f"(macro-F1 {knn_pca['macro_f1']:.3f})"
    )
    if knn_adapted is not None:
        print(
            f"  adapted to these cells (tl.adapt, {adapt_s:.1f} s with its embedding): "
            f"accuracy {knn_adapted['accuracy']:.3f} (macro-F1 {knn_adapted['macro_f1']:.3f})"
        )
    print(f"  wrote:            {h5ad} and {png}")
    return report
