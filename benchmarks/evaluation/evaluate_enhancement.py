"""Read-depth enhancement: recover full-depth profiles from down-sampled real PBMCs.

Usage (from the repository root)::

    python benchmarks/evaluation/evaluate_enhancement.py --model runs/small_pbmc --out benchmarks/results

The raw counts of all 2,170 pbmc4k cells are binomially down-sampled to 10% and 20% of their
depth (seeded). For the cells held out of the default model's pretraining (the 10% of
``default_model_splits.py``; subsampled to ``--n-cells``), the full-depth profile
``log1p(x / total * 1e4)`` is the truth, and each method predicts it from the down-sampled
counts alone:

- **down-sampled input**: the cell's own down-sampled, log-normalised profile;
- **kNN smoothing**: the mean log-normalised down-sampled profile of the cell's 15 nearest
  neighbours (itself included) in a PCA (50 PCs of 2,000 HVGs) of all down-sampled cells;
- **population mean**: the mean down-sampled profile of all cells (no cell-specific information);
- **scxtrimo enhance**: ``scxtrimo.tl.enhance`` with ``target_depth="fold:10"`` (10%) or
  ``"fold:5"`` (20%), i.e. the original depth; and ``"fold:1"`` (the down-sampled depth) to
  show what the target-depth token adds.

Per cell: Pearson r and MSE against the truth over all vocabulary genes detected in at least
one cell; Pearson r over the cell's truly detected genes only; Pearson r after subtracting each
gene's mean full-depth value over all cells from prediction and truth (the cell-specific part:
a constant profile scores 0). Reported: mean over cells. Per gene, for the 500 most variable
genes: Pearson r across the evaluated cells (median over genes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np

import default_model_splits as splits_mod
import scxtrimo
from _evaluation import (
    binomial_thin,
    command_line,
    load_model,
    log,
    machine,
    quiet,
    run_record,
    write_results,
)
from scxtrimo.metrics import log_normalized


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(axis=1) / den


def scores(
    pred: np.ndarray, truth: np.ndarray, gene_mean: np.ndarray, variable: np.ndarray
) -> dict[str, float]:
    """Per-cell agreement with the truth, and per-gene agreement across cells.

    ``gene_mean``: each gene's mean full-depth value over all cells, subtracted from both
    prediction and truth for the centred r (what is specific to the cell; a constant profile
    scores 0). ``variable``: genes (columns) for the gene-wise r across cells.
    """
    pred = np.asarray(pred, dtype=np.float64)
    r = rowwise_pearson(pred, truth)
    centred = rowwise_pearson(pred - gene_mean, truth - gene_mean)
    mse = ((pred - truth) ** 2).mean(axis=1)
    detected = truth > 0
    r_detected = np.array([np.corrcoef(p[m], t[m])[0, 1] for p, t, m in zip(pred, truth, detected)])
    genewise = rowwise_pearson(pred[:, variable].T, truth[:, variable].T)
    # A prediction constant across cells (population mean) has no gene-wise r: NaN, shown "—".
    genewise_median = float(np.nanmedian(genewise)) if np.isfinite(genewise).any() else np.nan
    return {
        "pearson_r": float(np.nanmean(r)),
        "pearson_r_sd": float(np.nanstd(r)),
        "mse": float(mse.mean()),
        "pearson_r_detected_genes": float(np.nanmean(r_detected)),
        "pearson_r_centred": float(np.nanmean(centred)),
        "genewise_pearson_r_median": genewise_median,
    }


def _fmt(value: float) -> str:
    """Three decimals; "—" where the score is undefined (a profile constant across cells)."""
    return "—" if not np.isfinite(value) else f"{value:.3f}"


def knn_smooth(down_norm: np.ndarray, cells: np.ndarray, k: int = 15) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    variance = down_norm.var(axis=0)
    genes = np.argsort(-variance)[:2000]
    x = down_norm[:, genes]
    x = np.clip((x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8), -10, 10)
    pcs = PCA(n_components=50, random_state=0).fit_transform(x)
    _, ind = NearestNeighbors(n_neighbors=k).fit(pcs).kneighbors(pcs[cells])
    return down_norm[ind].mean(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--n-cells", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet()
    start_all = time.perf_counter()
    model, model_info = load_model(args.model)
    adata = scxtrimo.datasets.pbmc4k()
    counts = adata.X.tocsr()
    truth_all = log_normalized(counts)
    genes = np.flatnonzero((counts > 0).sum(axis=0).A1 > 0)
    # The 10% of pbmc4k held out of the default model's pretraining (same rows as the file).
    heldout = splits_mod.pbmc4k_split(splits_mod.data_dir()).held_out
    rng = np.random.default_rng(args.seed)
    cells = np.sort(rng.choice(heldout, min(args.n_cells, heldout.size), replace=False))
    truth = truth_all[np.ix_(cells, genes)]
    gene_mean = truth_all[:, genes].mean(axis=0)
    variable = np.argsort(-truth_all[:, genes].var(axis=0))[:500]

    def score(pred, truth):
        return scores(pred, truth, gene_mean, variable)

    results = {}
    for rate in args.rates:
        log(f"rate {rate}: baselines")
        down = binomial_thin(counts, rate, args.seed)
        down_norm = log_normalized(down)
        depth = np.asarray(down.sum(axis=1)).ravel()[cells]
        rows = {
            "down-sampled input": score(down_norm[np.ix_(cells, genes)], truth),
            "kNN smoothing (k=15, PCA)": score(knn_smooth(down_norm, cells)[:, genes], truth),
            "population mean": score(
                np.broadcast_to(down_norm.mean(axis=0)[genes], truth.shape), truth
            ),
        }
        query = ad.AnnData(X=down[cells], obs=adata.obs.iloc[cells].copy(), var=adata.var)
        fold = round(1.0 / rate, 6)
        for target in (f"fold:{fold:g}", "fold:1"):
            log(f"rate {rate}: scxtrimo enhance, target_depth={target}")
            start = time.perf_counter()
            scxtrimo.tl.enhance(
                query,
                model,
                target_depth=target,
                key_added="enh",
                batch_size=args.batch_size,
                invalid_cells="skip",
            )
            seconds = time.perf_counter() - start
            pred = query.layers["enh"][:, genes]
            ok = np.isfinite(pred).all(axis=1)
            label = (
                f"scxtrimo enhance (target_depth={target!r})"
                if target != "fold:1"
                else "scxtrimo decoder at the input depth (target_depth='fold:1')"
            )
            observed = np.asarray(query.X[:, genes].todense()) > 0
            rows[label] = {
                **score(pred[ok], truth[ok]),
                "seconds": seconds,
                "n_cells_predicted": int(ok.sum()),
                # Mean prediction where the down-sampled input has counts, and where it has none.
                "mean_prediction_observed_genes": float(np.nanmean(pred[observed])),
                "mean_prediction_unobserved_genes": float(np.nanmean(pred[~observed])),
                "mean_truth_observed_genes": float(truth[observed].mean()),
            }
        results[f"{rate:g}"] = {
            "rate": rate,
            "median_counts_downsampled": float(np.median(depth)),
            "median_counts_full": float(np.median(np.asarray(counts[cells].sum(axis=1)).ravel())),
            "methods": rows,
        }
    total = time.perf_counter() - start_all
    rates = " ".join(f"{r:g}" for r in args.rates)
    command = command_line(
        "evaluate_enhancement.py",
        args.model,
        f" --rates {rates} --n-cells {args.n_cells} --seed {args.seed}",
    )
    result = run_record(
        command,
        model_info,
        n_cells=int(cells.size),
        n_genes=int(genes.size),
        total_seconds=total,
        results=results,
    )
    lines = [
        f"Read-depth enhancement on {cells.size} pbmc4k cells held out from pretraining "
        f"(`{model_info['config']}` model, `{model_info['path']}`"
        f"), {genes.size:,} genes; {total / 60:.1f} min on {machine()['torch_threads']} CPU "
        f"threads. Command: `{command}`",
        "",
    ]
    for rate, res in results.items():
        lines += [
            f"**{float(rate):.0%} depth** (median {res['median_counts_downsampled']:.0f} of "
            f"{res['median_counts_full']:.0f} counts per cell); truth = full-depth "
            "log1p(x / total * 1e4)",
            "",
            "| method | Pearson r (all genes) | MSE | Pearson r (detected genes) | "
            "Pearson r (centred per gene) | gene-wise r (500 HVGs, median) |",
            "|---|---|---|---|---|---|",
        ]
        best = max(r["pearson_r"] for r in res["methods"].values())
        for method, r in res["methods"].items():
            pr = f"**{r['pearson_r']:.3f}**" if r["pearson_r"] == best else f"{r['pearson_r']:.3f}"
            lines.append(
                f"| {method} | {pr} | {r['mse']:.4f} | {r['pearson_r_detected_genes']:.3f} | "
                f"{r['pearson_r_centred']:.3f} | {_fmt(r['genewise_pearson_r_median'])} |"
            )
        lines.append("")
    write_results(args.out, "evaluate_enhancement", result, lines)


if __name__ == "__main__":
    main()
