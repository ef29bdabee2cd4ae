"""Pretrain a model on real PBMCs and evaluate it against simple baselines.

Usage (from the repository root; the defaults are the recipe of the shipped model)::

    python benchmarks/evaluation/pretrain_pbmc4k.py --save-model runs/small_pbmc

What it measures, all on the 2,170 real pbmc4k cells shipped with scxtrimo:

1. Pretraining wall time (masked regression with read-depth-aware down-sampling).
2. Masked-value recovery on held-out cells (the 10% validation split, never trained on):
   30% of each cell's non-zero genes are masked (mask token, no down-sampling) and predicted;
   Pearson r and MSE (log1p-normalised scale) against three per-gene baselines fitted on the
   training cells: the gene's mean over all training cells; its expected value when masked in
   pretraining (``scxtrimo.train.expected_masked_values``, where the model's per-gene bias
   starts, so this row is the model before any training step); and its mean over the training
   cells where it is detected (this one knows the value is non-zero, which the model does not).
3. 5-fold kNN (k=15) cell-type accuracy of the embedding vs the scanpy PCA pipeline
   (50 PCs of 2,000 HVGs), same folds, on all labelled cells.

Writes ``pretrain_pbmc4k.json`` and ``pretrain_pbmc4k.md`` to ``--out`` and saves the model.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import scxtrimo
from scxtrimo.data import MaskingSpec, map_genes
from scxtrimo.data._tokens import NORMALIZE_SCALE, TokenIndex, pretraining_batch, row_seeds
from scxtrimo.model import XTrimoGene
from scxtrimo.train import expected_masked_values


def masked_recovery(model, adata, eval_cells, train_cells, seed=123):
    """Predict masked values of ``eval_cells``; baselines from ``train_cells``.

    Masking as in pretraining (30% of non-zero and 3% of zero genes, all as mask tokens, no
    down-sampling); scores on the masked non-zero values and on all masked values.
    """
    mapping = map_genes(adata.var)
    index = TokenIndex(model.config.n_genes)
    spec = MaskingSpec(
        nonzero_prob=0.3, zero_prob=0.03, replace_prob=1.0, random_prob=0.0, downsample_prob=0.0
    )
    X = adata.X.tocsr().astype(np.float64)
    totals = np.asarray(X.sum(axis=1)).ravel()
    norm = X.multiply(1.0 / totals[:, None]).tocsr()
    norm.data = np.log1p(norm.data * NORMALIZE_SCALE)
    train = norm[train_cells]
    mean_all = np.asarray(train.mean(axis=0)).ravel()
    detected = np.asarray((train > 0).sum(axis=0)).ravel()
    mean_nonzero = np.divide(
        np.asarray(train.sum(axis=0)).ravel(),
        detected,
        out=np.zeros_like(mean_all),
        where=detected > 0,
    )
    expected = expected_masked_values(
        adata.X, mapping.col_to_vocab, train_cells, model.config.n_genes, MaskingSpec()
    )
    # Oracle of what context can add: the same statistic within each cell type (uses labels).
    labels = adata.obs["cell_type"].to_numpy()
    by_type = {
        t: expected_masked_values(
            adata.X,
            mapping.col_to_vocab,
            train_cells[labels[train_cells] == t],
            model.config.n_genes,
            MaskingSpec(),
        )
        for t in np.unique(labels[train_cells])
    }
    # vocabulary index -> dataset column (pbmc4k maps one to one)
    vocab_to_col = np.full(model.config.n_genes, -1)
    vocab_to_col[mapping.col_to_vocab[mapping.col_to_vocab >= 0]] = np.flatnonzero(
        mapping.col_to_vocab >= 0
    )

    preds, targets, genes, oracle = [], [], [], []
    model.module.eval()
    with torch.inference_mode():
        for start in range(0, len(eval_cells), 32):
            cells = eval_cells[start : start + 32]
            batch = pretraining_batch(
                X,
                cells,
                mapping.col_to_vocab,
                index,
                spec,
                row_seeds(seed, 0, cells),
                model.default_max_genes,  # the cells as the model sees them
            )
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
            _, gen, _ = model.module(tensors)
            valid = ~batch["masked_pad"]
            preds.append(gen["prediction"].numpy()[valid])
            targets.append(batch["target_value"][valid])
            genes.append(batch["masked_index"][valid])
            per_cell = np.stack([by_type.get(labels[c], expected) for c in cells])
            slots = np.where(valid, batch["masked_index"], 0)
            oracle.append(np.take_along_axis(per_cell, slots, axis=1)[valid])
    pred, target, vocab = np.concatenate(preds), np.concatenate(targets), np.concatenate(genes)
    col = vocab_to_col[vocab]

    def per_gene(values):  # genes absent from the data set were never seen: 0
        return np.where(col >= 0, values[np.maximum(col, 0)], 0.0)

    predictions = {
        "model": pred,
        "per_gene_mean": per_gene(mean_all),
        "per_gene_expected_masked_value": expected[vocab],
        "per_cell_type_expected_masked_value": np.concatenate(oracle),
        "per_gene_mean_of_detected": per_gene(mean_nonzero),
    }

    def score(p, subset):
        return {
            "pearson_r": float(np.corrcoef(p[subset], target[subset])[0, 1]),
            "mse": float(np.mean((p[subset] - target[subset]) ** 2)),
        }

    nonzero = target != 0
    everything = np.ones_like(nonzero)
    out = {"n_masked_values": int(target.size), "n_masked_nonzero": int(nonzero.sum())}
    for name, p in predictions.items():
        out[name] = score(p, nonzero)
        out[f"{name}_all_masked"] = score(p, everything)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-genes", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--save-model", type=Path, default=None)
    args = parser.parse_args()
    scxtrimo.settings.progress_bar = False
    args.out.mkdir(parents=True, exist_ok=True)

    adata = scxtrimo.datasets.pbmc4k()
    XTrimoGene.setup_anndata(adata)  # self-supervised: the labels are only for the kNN score
    model = XTrimoGene(adata, config=args.config, seed=args.seed)
    start = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_genes=args.max_genes,
        seed=args.seed,
        enable_progress_bar=False,
    )
    train_s = time.perf_counter() - start
    if args.save_model:
        model.save(args.save_model, overwrite=True)

    recovery = masked_recovery(
        model, adata, np.asarray(model.validation_indices), np.asarray(model.train_indices)
    )
    start = time.perf_counter()
    emb = model.get_latent_representation(progress_bar=False)
    embed_s = time.perf_counter() - start
    pca = scxtrimo.metrics.pca_baseline(adata)
    labelled = (adata.obs["cell_type"] != "?").to_numpy()
    labels = adata.obs["cell_type"].to_numpy()[labelled]
    # Control: the same architecture before training, cells seen the same way.
    untrained = XTrimoGene(None, config=args.config, seed=args.seed)
    emb_untrained = untrained.get_latent_representation(
        adata, max_genes=args.max_genes, progress_bar=False
    )
    knn = {
        "scxtrimo": scxtrimo.metrics.knn_accuracy(emb[labelled], labels),
        "untrained": scxtrimo.metrics.knn_accuracy(emb_untrained[labelled], labels),
        "pca50": scxtrimo.metrics.knn_accuracy(pca[labelled], labels),
    }
    history = {k: v[k].astype(float).tolist() for k, v in model.history.items()}
    result = {
        "command": f"python benchmarks/evaluation/pretrain_pbmc4k.py --config {args.config} --max-epochs {args.max_epochs} "
        f"--batch-size {args.batch_size} --lr {args.lr} --max-genes {args.max_genes} --seed {args.seed}",
        "machine": {
            "cpu_cores": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "config": args.config,
        "n_parameters": int(sum(p.numel() for p in model.module.parameters())),
        "n_train_cells": len(model.train_indices),
        "n_heldout_cells": len(model.validation_indices),
        "train_seconds": round(train_s, 1),
        "embed_seconds_all_cells": round(embed_s, 1),
        "masked_recovery_heldout": recovery,
        "knn15_5fold": knn,
        "history": history,
    }
    (args.out / "pretrain_pbmc4k.json").write_text(json.dumps(result, indent=1))
    r = recovery
    lines = [
        f"Pretraining `{args.config}` ({result['n_parameters']:,} parameters) on pbmc4k: "
        f"{result['n_train_cells']} training cells, {args.max_epochs} epochs, {train_s / 60:.1f} min on "
        f"{torch.get_num_threads()} CPU threads. Command: `{result['command']}`",
        "",
        f"Masked values of the {result['n_heldout_cells']} held-out cells "
        f"({r['n_masked_nonzero']:,} non-zero of {r['n_masked_values']:,} masked; "
        "log1p-normalised scale; baselines fitted on the training cells):",
        "",
        "| predictor | non-zero: Pearson r | non-zero: MSE | all masked: Pearson r | all masked: MSE |",
        "|---|---|---|---|---|",
    ]
    names = [
        ("model", f"xTrimoGene `{args.config}`"),
        ("per_gene_mean", "per-gene mean"),
        ("per_gene_expected_masked_value", "per-gene expected masked value (the model's start)"),
        (
            "per_cell_type_expected_masked_value",
            "same, within the cell's type (oracle: uses the labels)",
        ),
        ("per_gene_mean_of_detected", "per-gene mean where detected (knows the value is > 0)"),
    ]
    for key, label in names:
        nz, al = r[key], r[f"{key}_all_masked"]
        lines.append(
            f"| {label} | {nz['pearson_r']:.3f} | {nz['mse']:.3f} | {al['pearson_r']:.3f} "
            f"| {al['mse']:.3f} |"
        )
    lines += [
        "",
        "| 5-fold kNN (k=15) cell-type classification | accuracy | macro-F1 |",
        "|---|---|---|",
        f"| `X_scxtrimo` ({emb.shape[1]}-d) | {knn['scxtrimo']['accuracy']:.3f} | {knn['scxtrimo']['macro_f1']:.3f} |",
        f"| same architecture, untrained (control) | {knn['untrained']['accuracy']:.3f} | {knn['untrained']['macro_f1']:.3f} |",
        f"| scanpy PCA (50 PCs of 2,000 HVGs) | {knn['pca50']['accuracy']:.3f} | {knn['pca50']['macro_f1']:.3f} |",
    ]
    (args.out / "pretrain_pbmc4k.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
