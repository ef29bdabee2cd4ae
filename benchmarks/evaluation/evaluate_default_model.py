"""Held-out evaluation of the shipped default model beside its baselines, in one run.

Usage::

    python benchmarks/evaluation/evaluate_default_model.py \\
        --model shipped --previous /path/to/previous_default \\
        --ablation no_contrastive=runs/abl_nocontrastive/final ...

Every split keeps its evaluation cells out of pretraining (``default_model_splits.py``); a
classifier is fitted on the training part's embeddings and labels and scored on the held-out
part, for every embedding in the same run:

- pbmc4k: 90% -> the 10% held out;
- Kang 12k: six donors -> two donors held out entirely;
- CellBench: CEL-seq2 -> Drop-seq (cross-protocol);
- pbmc4k -> Kang (cross-study, shared cell types, both files cut to their common genes).

At most 2,000 reference and 1,500 held-out cells per split are drawn (seeded), the same for
every embedding. Embeddings: the model(s), an untrained model of the same configuration, PCA-50
on 2,000 HVGs of log-normalised counts (fitted on the training part) and, for a default with a
cell head, its pooled vector without the head. Metrics: kNN (k = 15) macro-F1,
logistic-regression macro-F1 and ``scxtrimo.tl.transfer_labels`` (distance-weighted kNN)
macro-F1. A diagnosis of what each model's embedding encodes (correlation of its leading
components with log total counts and genes per cell, per part of the pooled vector) is
written too. Results: ``benchmarks/results/default_model.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import default_model_splits as splits_mod
import scxtrimo
from scxtrimo.model import XTrimoGene

RESULTS = Path(__file__).resolve().parents[1] / "results"
PARTS = ("S", "T", "gene max", "gene mean")


def log(message: str) -> None:
    """Progress on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pca_embedding(adata: ad.AnnData, train: np.ndarray, n_comps: int = 50) -> np.ndarray:
    """PCA-50 on 2,000 HVGs of log-normalised counts, fitted on the training rows only."""
    work = ad.AnnData(X=adata.X.astype(np.float32))
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    hvg = sc.pp.highly_variable_genes(work[train].copy(), n_top_genes=2000, inplace=False)
    X = work.X[:, hvg["highly_variable"].to_numpy()]
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    scaler = StandardScaler().fit(X[train])
    X = np.clip(scaler.transform(X), -10, 10)
    return PCA(n_comps, random_state=0).fit(X[train]).transform(X)


def scores(emb: np.ndarray, labels: np.ndarray, ref: np.ndarray, query: np.ndarray) -> dict:
    """kNN (k=15), logistic regression and distance-weighted kNN vote macro-F1, ref -> query."""
    y_ref, y_query = labels[ref], labels[query]
    knn = KNeighborsClassifier(n_neighbors=15).fit(emb[ref], y_ref)
    scaler = StandardScaler().fit(emb[ref])
    lr = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(emb[ref]), y_ref)
    reference = ad.AnnData(obs={"cell_type": y_ref}, obsm={"X_scxtrimo": emb[ref]})
    target = ad.AnnData(obs={"i": np.arange(len(query))}, obsm={"X_scxtrimo": emb[query]})
    scxtrimo.tl.transfer_labels(target, reference, labels_key="cell_type")
    transferred = target.obs["cell_type_transferred"].astype(str).to_numpy()

    def f1(pred):
        return float(f1_score(y_query, pred, average="macro"))

    return {
        "knn_macro_f1": f1(knn.predict(emb[query])),
        "logreg_macro_f1": f1(lr.predict(scaler.transform(emb[query]))),
        "transfer_labels_macro_f1": f1(transferred),
    }


def variants(emb: np.ndarray, dim: int, ref: np.ndarray) -> dict[str, np.ndarray]:
    """Parts of the pooled vector ``[S, T, gene max, gene mean]`` and a standardised copy."""
    out = {
        "gene max part": emb[:, 2 * dim : 3 * dim],
        "gene mean part": emb[:, 3 * dim :],
        "gene max + mean": emb[:, 2 * dim :],
    }
    filled = np.nan_to_num(emb)
    out["standardised (on reference)"] = StandardScaler().fit(filled[ref]).transform(filled)
    return out


def diagnosis(emb: np.ndarray, adata: ad.AnnData, rows: np.ndarray, dim: int) -> dict:
    """|Pearson r| of each pooled part's first 3 PCs with log total counts and genes/cell."""
    X = adata.X[rows]
    depth = np.log10(np.asarray(X.sum(axis=1)).ravel())
    genes = np.log10(np.asarray((X > 0).sum(axis=1)).ravel())
    out = {}
    for i, name in enumerate(PARTS):
        part = emb[rows, i * dim : (i + 1) * dim]
        pcs = PCA(3, random_state=0).fit_transform(part)
        out[name] = {
            "log_total_counts": [float(abs(np.corrcoef(pc, depth)[0, 1])) for pc in pcs.T],
            "log_genes": [float(abs(np.corrcoef(pc, genes)[0, 1])) for pc in pcs.T],
        }
    return out


def load_models(args) -> dict[str, XTrimoGene]:
    """The models of this run, by name (``shipped`` = the package's default)."""
    from scxtrimo.model._pretrained import load_default_model

    models = {}
    models["default"] = (
        load_default_model() if args.model == "shipped" else XTrimoGene.load(args.model)
    )
    if args.previous:
        models["previous recipe"] = XTrimoGene.load(args.previous)
    for spec in args.ablation:
        name, path = spec.split("=", 1)
        models[name] = XTrimoGene.load(path)
    default = models["default"]
    if default.module.cell_head is not None:  # what the head adds over the pooled vector
        pooled = default.copy()
        pooled.module.cell_head = None
        pooled.module.config = pooled.module.config.replace(cell_head_dim=0)
        models["default: pooled vector, no head"] = pooled
    # An untrained model of the default's configuration, embedding the same way.
    ref = splits_mod.pbmc4k_split(splits_mod.data_dir(args.data)).adata
    XTrimoGene.setup_anndata(ref)
    torch.manual_seed(0)
    untrained = XTrimoGene(ref, config=default.config.replace(cell_head_dim=0), seed=0)
    untrained.default_max_genes_ = default.default_max_genes_
    untrained.default_target_depth_ = default.default_target_depth_
    models["untrained"] = untrained
    return models


def main() -> None:
    """Run every split for every embedding and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shipped", help="'shipped' or a saved-model folder")
    parser.add_argument("--previous", default=None, help="the previous recipe's saved model")
    parser.add_argument("--ablation", action="append", default=[], help="NAME=PATH")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--max-cells", type=int, default=None, help="cap reference and query (a quick check)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    splits = splits_mod.all_splits(args.data)
    models = load_models(args)
    tasks = []  # (task name, adata, labels, reference rows, query rows)
    for cells in splits_mod.scored_cells(splits):
        adata, labels, ref, query = cells.adata, cells.labels, cells.reference, cells.query
        if args.max_cells and cells.name == "pbmc4k -> Kang":  # one AnnData: keep its first rows
            n_p = len(ref)
            keep = np.r_[: args.max_cells, n_p : n_p + args.max_cells]
            adata, labels = adata[keep].copy(), labels[keep]
            ref, query = np.arange(args.max_cells), np.arange(args.max_cells, len(keep))
        elif args.max_cells:
            ref, query = ref[: args.max_cells], query[: args.max_cells]
        tasks.append((cells.name, adata, labels, ref, query))
    log(
        f"cross-study: {tasks[-1][1].n_vars} common genes, {len(tasks[-1][3])} -> {len(tasks[-1][4])} cells"
    )

    results: dict = {"tasks": {}, "diagnosis": {}, "models": {}}
    for task, adata, labels, ref, query in tasks:
        rows = np.concatenate([ref, query])
        pca = pca_embedding(adata, ref)
        table = {"PCA-50 (2,000 HVGs)": scores(pca, labels, ref, query)}
        for name, model in models.items():
            tm = time.time()
            emb = np.full((adata.n_obs, model.module.embedding_width()), np.nan, np.float32)
            emb[rows] = model.get_latent_representation(
                adata, indices=rows, progress_bar=False, invalid_cells="raise"
            )
            table[name] = scores(emb, labels, ref, query)
            pooled = model.module.cell_head is None  # the parts of [h(S), h(T), max, mean]
            if name == "default" and pooled:  # which part of the pooled vector carries the type
                dim = model.module.config.encoder_dim
                for variant, sub in variants(emb, dim, ref).items():
                    table[f"default: {variant}"] = scores(sub, labels, ref, query)
            if task == "pbmc4k" and pooled:
                results["diagnosis"][name] = diagnosis(
                    emb, adata, query, model.module.config.encoder_dim
                )
            log(f"{task}: {name} {table[name]} ({time.time() - tm:.0f} s)")
        results["tasks"][task] = {
            "n_reference": len(ref),
            "n_query": len(query),
            "scores": table,
        }
    results["models"] = {
        name: {
            "training_args": getattr(m, "training_args_", None),
            "config": m.config.to_dict() if hasattr(m.config, "to_dict") else str(m.config),
        }
        for name, m in models.items()
    }
    results["wall_s"] = time.time() - t0
    results["threads"] = torch.get_num_threads()
    write(results, args.out)
    log(f"done in {results['wall_s'] / 60:.1f} min")


def write(results: dict, out: Path) -> None:
    """JSON and a markdown table (every number beside the PCA baseline of the same run)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_model.json").write_text(json.dumps(results, indent=1, default=str))
    lines = [
        "Classifier fitted on the training part's embeddings, scored on the held-out part "
        "(macro-F1). Ratios: kNN macro-F1 / PCA's kNN macro-F1 (target >= 0.95) and "
        "transfer_labels macro-F1 / PCA + logistic regression macro-F1 (target >= 0.9). "
        "Command: `python benchmarks/evaluation/evaluate_default_model.py` (see its docstring); "
        f"{results.get('wall_s', 0) / 60:.1f} min on {results.get('threads', '?')} CPU threads.",
        "",
    ]
    for task, block in results["tasks"].items():
        lines += [
            f"### {task} ({block['n_reference']} reference -> {block['n_query']} held-out cells)",
            "",
            "| embedding | kNN macro-F1 | kNN / PCA kNN | logistic regression "
            "| transfer_labels | transfer / PCA+LR |",
            "|---|---|---|---|---|---|",
        ]
        pca = block["scores"]["PCA-50 (2,000 HVGs)"]
        for name, s in block["scores"].items():
            lines.append(
                f"| {name} | {s['knn_macro_f1']:.3f} | {s['knn_macro_f1'] / pca['knn_macro_f1']:.2f}"
                f" | {s['logreg_macro_f1']:.3f} | {s['transfer_labels_macro_f1']:.3f} | "
                f"{s['transfer_labels_macro_f1'] / pca['logreg_macro_f1']:.2f} |"
            )
        lines.append("")
    lines += [
        "### Diagnosis: what the embedding encodes (pbmc4k held-out cells)",
        "",
        "|Pearson r| of the first three principal components of each part of the pooled vector "
        "with log10 total counts / log10 genes per cell.",
        "",
        "| model | part | PC1-3 vs depth | PC1-3 vs genes |",
        "|---|---|---|---|",
    ]
    for name, parts in results["diagnosis"].items():
        for part, d in parts.items():
            depth = ", ".join(f"{v:.2f}" for v in d["log_total_counts"])
            genes = ", ".join(f"{v:.2f}" for v in d["log_genes"])
            lines.append(f"| {name} | {part} | {depth} | {genes} |")
    lines.append("")
    (out / "default_model.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
