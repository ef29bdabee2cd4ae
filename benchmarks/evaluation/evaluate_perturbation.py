"""Perturbation response: leave-one-cell-type-out on Kang 2018 IFN-β, against baselines.

Usage (from the repository root; about a minute on one CPU core)::

    python benchmarks/evaluation/evaluate_perturbation.py            # the model shipped with scxtrimo
    python benchmarks/evaluation/evaluate_perturbation.py --model runs/small_pbmc

Data: ``kang2018_ifnb_pbmc_1556.h5ad`` of the shared data (``$SCXTRIMO_SHARED_DATA``, else
``../shared/data`` beside the repository): 1,556 PBMCs of 2 donors, control and
6 h IFN-β, 5 cell types, 1,267 genes (the scGen / CPA benchmark). Each cell type in turn is
held out: every method learns from the control and stimulated cells of the 4 other types and
predicts the stimulated profile of the held-out type's control cells; the held-out type's
stimulated cells are used only to score.

Truth and metrics, on ``log1p(counts / total * 1e4)``, per held-out type:

* ``true`` = mean over its stimulated cells, ``ctrl`` = mean over its control cells,
  ``pred`` = mean over the predicted cells.
* **DE genes of the true response**: the genes with the largest ``|true - ctrl|``.
* ``R²`` = coefficient of determination of ``pred`` against ``true`` (``1 - SS_res / SS_tot``
  over genes; can be negative) on all genes, the top-20 and the top-100 DE genes; the squared
  Pearson correlation (scGen's convention) is in the JSON too.
* ``MSE top-20 DE``: mean over the top-20 DE genes of ``(pred - true)²``.
* ``direction top-100 DE``: share of the top-100 DE genes where ``sign(pred - ctrl)`` equals
  ``sign(true - ctrl)`` (a prediction of no change counts as wrong).

Methods: no change (``ctrl``); mean shift (``ctrl`` + the average response of the 4 seen
types); nearest seen type (its response, the type whose control centroid is nearest in the
PCA of the expression); PCA + ridge (a linear model of the latent shift, below);
``scxtrimo.tl.predict_perturbation`` on the model's embedding (the method), and the same head
on the PCA of the expression (a control: what the embedding adds). scGen is reported as not
run when it cannot be imported (see ``SCGEN_STATUS``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np

import scxtrimo
from _evaluation import SHARED_DATA, _config_name, log, machine, write_results
from scxtrimo.tl._perturbation import _log_normalize

KANG_IFNB = SHARED_DATA / "kang2018_ifnb_pbmc_1556.h5ad"
CONDITION, CONTROL, STIM, GROUP = "condition", "ctrl", "stim", "cell_type"
RIDGE_ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4)

# What happened when scGen was tried in this environment (torch 2.13.0 CPU, scvi-tools 1.4.2).
SCGEN_STATUS = (
    "not run: `pip install --dry-run scgen` would add only scgen 2.1.0 and adjustText (torch "
    "unchanged), but scgen 2.1.0 fails to import with scvi-tools 1.4.2 "
    "(`ModuleNotFoundError: No module named 'scvi._compat'`), so it was uninstalled again; "
    "pertpy 1.0.3 (whose Scgen runs on JAX) would install 45 packages (jax, flax, numpyro...) "
    "and upgrade shared ones (requests, urllib3, psutil...) in a shared environment, so it was "
    "not installed. PCA + ridge below is the linear analogue of scGen's latent arithmetic."
)

METRICS = ("r2_all", "r2_top20", "r2_top100", "mse_top20", "direction_top100")
HEADERS = ("R² all", "R² top-20 DE", "R² top-100 DE", "MSE top-20 DE", "direction top-100 DE")
LOWER_IS_BETTER = {"mse_top20"}


def _mean(x, rows) -> np.ndarray:
    return np.asarray(x[rows].mean(axis=0)).ravel()


def _r2(pred: np.ndarray, true: np.ndarray) -> float:
    return float(1.0 - ((pred - true) ** 2).sum() / ((true - true.mean()) ** 2).sum())


def _pearson_r2(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.corrcoef(pred, true)[0, 1] ** 2) if pred.std() > 0 else 0.0


def scores(pred: np.ndarray, true: np.ndarray, ctrl: np.ndarray) -> dict[str, float]:
    """The metrics of the module docstring for mean vectors ``pred``, ``true``, ``ctrl``."""
    order = np.argsort(-np.abs(true - ctrl), kind="stable")
    top20, top100 = order[:20], order[:100]
    return {
        "r2_all": _r2(pred, true),
        "r2_top20": _r2(pred[top20], true[top20]),
        "r2_top100": _r2(pred[top100], true[top100]),
        "mse_top20": float(((pred[top20] - true[top20]) ** 2).mean()),
        "direction_top100": float(
            (np.sign(pred[top100] - ctrl[top100]) == np.sign(true[top100] - ctrl[top100])).mean()
        ),
        "pearson_r2_all": _pearson_r2(pred, true),
        "pearson_r2_top100": _pearson_r2(pred[top100], true[top100]),
    }


def _pca(x: np.ndarray, n_comps: int):
    """Mean and the top principal axes of the rows of ``x`` (exact SVD: deterministic)."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:n_comps]


def pca_ridge(lognorm, rows, seen, held_out_control, n_comps: int) -> tuple[np.ndarray, dict]:
    """Linear latent-shift model: ridge from a control cell's PCs to its type's PC shift.

    PCA (``n_comps``) of all training cells (seen types, both conditions); for each seen type
    ``g`` the latent shift ``mean PC(stim_g) - mean PC(ctrl_g)``; a ridge regression from each
    seen control cell's PC scores to its type's shift (alpha by leave-one-seen-type-out);
    prediction = held-out control cell + the decoded predicted shift.
    """
    from sklearn.linear_model import Ridge

    train_rows = np.concatenate([rows[g][c] for g in seen for c in (CONTROL, STIM)])
    mean, axes = _pca(lognorm[train_rows].toarray(), n_comps)
    scores_of = {
        g: {c: (lognorm[rows[g][c]].toarray() - mean) @ axes.T for c in rows[g]} for g in seen
    }
    shift = {g: scores_of[g][STIM].mean(0) - scores_of[g][CONTROL].mean(0) for g in seen}

    def fit(groups, alpha):
        xs = np.concatenate([scores_of[g][CONTROL] for g in groups])
        ys = np.concatenate(
            [np.tile(shift[g], (scores_of[g][CONTROL].shape[0], 1)) for g in groups]
        )
        return Ridge(alpha=alpha).fit(xs, ys)

    cv = {}
    for alpha in RIDGE_ALPHAS:
        errors = []
        for g in seen:
            model = fit([h for h in seen if h != g], alpha)
            errors.append(((model.predict(scores_of[g][CONTROL]).mean(0) - shift[g]) ** 2).sum())
        cv[alpha] = float(np.mean(errors))
    best = min(cv, key=cv.get)
    query = (lognorm[held_out_control].toarray() - mean) @ axes.T
    predicted_shift = fit(seen, best).predict(query).mean(0) @ axes
    return _mean(lognorm, held_out_control) + predicted_shift, {"alpha": best, "cv_error": cv}


def nearest_type(lognorm, rows, seen, held_out_control, n_comps: int) -> tuple[np.ndarray, dict]:
    """The response of the seen type whose control centroid is nearest in expression PCA."""
    control_rows = np.concatenate([rows[g][CONTROL] for g in seen])
    mean, axes = _pca(lognorm[control_rows].toarray(), n_comps)
    project = lambda r: ((lognorm[r].toarray() - mean) @ axes.T).mean(0)  # noqa: E731
    target = project(held_out_control)
    distance = {g: float(((project(rows[g][CONTROL]) - target) ** 2).sum()) for g in seen}
    nearest = min(distance, key=distance.get)
    response = _mean(lognorm, rows[nearest][STIM]) - _mean(lognorm, rows[nearest][CONTROL])
    return _mean(lognorm, held_out_control) + response, {"nearest": nearest}


def evaluate(adata, lognorm, args) -> dict:
    obs = adata.obs
    types = list(obs[GROUP].cat.categories)
    rows = {
        g: {
            c: np.flatnonzero(((obs[GROUP] == g) & (obs[CONDITION] == c)).to_numpy())
            for c in (CONTROL, STIM)
        }
        for g in types
    }
    per_type = {}
    for held_out in types:
        log(f"held out: {held_out}")
        seen = [g for g in types if g != held_out]
        ctrl = _mean(lognorm, rows[held_out][CONTROL])
        true = _mean(lognorm, rows[held_out][STIM])
        responses = [_mean(lognorm, rows[g][STIM]) - _mean(lognorm, rows[g][CONTROL]) for g in seen]
        methods, extra = {}, {}
        methods["no change (control mean)"] = ctrl
        methods["mean shift (average response of the seen types)"] = ctrl + np.mean(responses, 0)
        methods["nearest seen type's response (expression PCA)"], extra["nearest"] = nearest_type(
            lognorm, rows, seen, rows[held_out][CONTROL], args.n_comps
        )
        start = time.perf_counter()
        methods[f"PCA ({args.n_comps}) + ridge latent shift"], extra["ridge"] = pca_ridge(
            lognorm, rows, seen, rows[held_out][CONTROL], args.n_comps
        )
        extra["ridge"]["seconds"] = time.perf_counter() - start
        for name, representation in (
            ("scxtrimo.tl.predict_perturbation (model embedding)", "embedding"),
            ("control: same head on expression PCA (no model)", "expression"),
        ):
            predicted = scxtrimo.tl.predict_perturbation(
                adata,
                condition_key=CONDITION,
                control=CONTROL,
                groupby=GROUP,
                held_out=held_out,
                representation=representation,
                random_state=args.seed,
            )
            info = predicted.uns["scxtrimo_perturbation"]
            methods[name] = np.asarray(predicted.X.mean(axis=0)).ravel()
            extra[representation] = {
                "gate": info["gate"][STIM],
                "temperature": info["temperature"][STIM],
                "mean_group_weights": info["mean_group_weights"][STIM],
                "train_seconds": info["train_seconds"],
                "n_predicted_cells": int(predicted.n_obs),
            }
        per_type[held_out] = {
            "n_control": int(rows[held_out][CONTROL].size),
            "n_stim": int(rows[held_out][STIM].size),
            "methods": {name: scores(pred, true, ctrl) for name, pred in methods.items()},
            "details": extra,
        }
    names = list(next(iter(per_type.values()))["methods"])
    mean = {
        name: {
            m: float(np.mean([per_type[t]["methods"][name][m] for t in types]))
            for m in next(iter(per_type.values()))["methods"][name]
        }
        for name in names
    }
    return {"cell_types": types, "per_cell_type": per_type, "mean": mean}


def _table(rows: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| method | " + " | ".join(HEADERS) + " |", "|---" * (len(HEADERS) + 1) + "|"]
    best = {m: (min if m in LOWER_IS_BETTER else max)(r[m] for r in rows.values()) for m in METRICS}
    for name, r in rows.items():
        cells = [f"**{r[m]:.3f}**" if r[m] == best[m] else f"{r[m]:.3f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _weights_hash(model: Path | None) -> str | None:
    import hashlib

    folder = (
        Path(scxtrimo.__file__).parent / "_resources" / "pretrained" if model is None else model
    )
    weights = folder / "model.pt" if folder.is_dir() else folder
    return hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--n-comps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    scxtrimo.settings.progress_bar = False
    scxtrimo.settings.verbosity = "error"
    start = time.perf_counter()
    adata = ad.read_h5ad(KANG_IFNB)
    lognorm = _log_normalize(adata.X, 1e4)
    net = scxtrimo.model.resolve_model(None if args.model is None else args.model)
    model_info = {
        "path": "shipped default (scxtrimo/_resources/pretrained)"
        if args.model is None
        else str(args.model),
        "source": net.source_,
        "config": _config_name(net),
        "training_args": net.training_args_,
        # Which weights exactly: the shipped model may be replaced by a retrained one.
        "weights_sha256": _weights_hash(args.model),
    }
    log(f"model: {model_info['path']} ({model_info['source']})")
    # Embed the control cells once (an embedding does not depend on the other cells); the
    # method then reads .obsm, exactly as if it had embedded them itself.
    embed_start = time.perf_counter()
    is_control = (adata.obs[CONDITION] == CONTROL).to_numpy()
    controls = adata[is_control].copy()
    scxtrimo.tl.embed(controls, net, invalid_cells="skip")
    embedding = np.full((adata.n_obs, controls.obsm["X_scxtrimo"].shape[1]), np.nan, np.float32)
    embedding[is_control] = controls.obsm["X_scxtrimo"]
    adata.obsm["X_scxtrimo"] = embedding
    embed_seconds = time.perf_counter() - embed_start
    res = evaluate(adata, lognorm, args)
    total = time.perf_counter() - start
    command = "python benchmarks/evaluation/evaluate_perturbation.py" + (
        f" --model {args.model}" if args.model else ""
    )
    result = {
        "command": command,
        "data": f"{KANG_IFNB.name} (shared data)",
        "model": model_info,
        "machine": machine(),
        "seed": args.seed,
        "embedding_seconds": embed_seconds,
        "total_seconds": total,
        "scgen": SCGEN_STATUS,
        "de_genes": "largest |mean(stim) - mean(ctrl)| of log1p(x/total*1e4) in the held-out type",
        **res,
    }
    method = "scxtrimo.tl.predict_perturbation (model embedding)"
    shift = "mean shift (average response of the seen types)"
    wins = {
        m: sum(
            (r["methods"][method][m] < r["methods"][shift][m])
            if m in LOWER_IS_BETTER
            else (r["methods"][method][m] > r["methods"][shift][m])
            for r in res["per_cell_type"].values()
        )
        for m in METRICS
    }
    result["wins_over_mean_shift"] = wins
    lines = [
        f"Perturbation response on **Kang 2018 IFN-β PBMCs** ({adata.n_obs:,} cells, "
        f"{adata.n_vars:,} genes), leave-one-cell-type-out over {len(res['cell_types'])} types, "
        f"with the `{model_info['config']}` model ({model_info['path']}, `{model_info['source']}`)"
        f"; {total:.0f} s on {args.threads} CPU thread(s), of which {embed_seconds:.0f} s "
        f"embedding the control cells. Command: `{command}`",
        "",
        "**Mean over the 5 held-out cell types** (best in bold):",
        "",
        *_table(res["mean"]),
        "",
        f"scxtrimo (model embedding) beats mean shift on, out of {len(res['cell_types'])} cell "
        "types: " + ", ".join(f"{h} {wins[m]}" for m, h in zip(METRICS, HEADERS)) + ".",
        "",
        f"scGen: {SCGEN_STATUS}",
    ]
    for cell_type, r in res["per_cell_type"].items():
        details = r["details"]
        weights = ", ".join(
            f"{g} {w:.2f}" for g, w in details["embedding"]["mean_group_weights"].items()
        )
        lines += [
            "",
            f"**Held out: {cell_type}** ({r['n_control']} control, {r['n_stim']} stimulated "
            f"cells). Head weights on the seen types (embedding): {weights}; gate "
            f"{details['embedding']['gate']:.2f}. Nearest type (PCA): "
            f"{details['nearest']['nearest']}; ridge alpha {details['ridge']['alpha']:g}.",
            "",
            *_table(r["methods"]),
        ]
    write_results(args.out, "perturbation", result, lines)


if __name__ == "__main__":
    main()
