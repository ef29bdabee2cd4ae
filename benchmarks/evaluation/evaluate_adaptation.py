"""One evaluation of adaptation: PCA, scVI, zero-shot and adapted scxtrimo on the held-out splits.

Usage::

    python benchmarks/evaluation/evaluate_adaptation.py                  # every split, method
    python benchmarks/evaluation/evaluate_adaptation.py --methods pca zero_shot --splits pbmc4k
    python benchmarks/evaluation/evaluate_adaptation.py --quick          # a smoke run (minutes)

The splits are those of ``default_model_splits.py`` and the evaluated cells those of
``evaluate_default_model.py`` (the same seeded draw: at most 2,000 reference and 1,500 held-out
cells per split), so the numbers compare with ``benchmarks/results/default_model.md``:

- pbmc4k: 90% -> the 10% held out;
- kang12k: six donors -> donors 1039 and 1244 (batches: donors);
- cellbench: CEL-seq2 -> Drop-seq (batches: the two protocols);
- pbmc4k -> Kang: pbmc4k's training part -> Kang's held-out donors, common genes, shared cell
  types (batches: the two studies).

**The user's dataset** of a split is its evaluated cells (reference and held-out together),
raw counts, without labels. Every method is fitted on exactly those cells, as a user would:

- ``pca``: normalize_total (1e4), log1p, 2,000 HVGs, scaled (clipped at 10), 50 PCs;
- ``scvi``: scvi-tools defaults on 2,000 ``seurat_v3`` HVGs of the counts (genes with at least
  3 counts, as in scvi-tools' tutorials), ``batch_key`` where the split has batches, ``SCVI(adata).train()`` with its default epochs;
- ``zero_shot``: ``scxtrimo.tl.embed(adata)`` with the shipped default;
- ``adapted_default``: ``scxtrimo.tl.adapt(adata, batch_key=...)`` then ``tl.embed``;
- ``adapted_untrained``: the same adaptation from an untrained model of the default's
  configuration (does pretraining help at all?).

Scores: a kNN (k = 15) and a logistic-regression classifier fitted on the reference cells'
embedding and labels, macro-F1 on the held-out cells (as ``evaluate_default_model.py``); batch
mixing where the split has batches: the mean over all cells of the Shannon entropy of the batch
labels among their 50 nearest neighbours, divided by log(number of batches) (1 = every
neighbourhood holds all batches equally; the value of a perfectly mixed embedding, the entropy
of the batches' overall shares, is given beside it). Cost: wall time of the fit and of the
embedding, and peak memory: the peak resident set size (Linux ``VmHWM``, reset before the fit)
minus the resident set size when the fit starts, in a fresh process per method with its
libraries already imported.

Each method runs in its own process (``--worker``) on ``--threads`` threads (default 2), with
``OMP_WAIT_POLICY=PASSIVE`` unless set (waiting threads sleep rather than spin; the machines these
runs share are loaded). Results
are merged into ``<out>/adaptation.json`` (a run replaces the entries it computes; ``--fresh``
starts over) and ``adaptation.md`` is written from them; both are replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scxtrimo.metrics import batch_mixing, well_mixed_batch_mixing

HERE = Path(__file__).resolve().parent
ROOT = next(p for p in HERE.parents if (p / "pyproject.toml").is_file())
RESULTS = ROOT / "benchmarks" / "results"
NAME = "adaptation"

QUICK_REFERENCE, QUICK_QUERY = 150, 100  # --quick: the first cells of each part
QUICK_SCVI_EPOCHS, QUICK_ADAPT_STEPS = 3, 3
K_CLASSIFIER = 15
K_MIXING = 50

SPLITS = ("pbmc4k", "kang12k", "cellbench", "pbmc4k -> Kang")
SPLIT_ALIASES = {"pbmc4k_to_kang": "pbmc4k -> Kang"}
METHODS = ("pca", "scvi", "zero_shot", "adapted_default", "adapted_untrained")
ADAPT_METHODS = ("adapted_default", "adapted_untrained")
METHOD_LABELS = {
    "pca": "PCA-50 (2,000 HVGs)",
    "scvi": "scVI (defaults, 2,000 seurat_v3 HVGs)",
    "zero_shot": "scxtrimo zero-shot (shipped default)",
    "adapted_default": "scxtrimo adapted (from the default)",
    "adapted_untrained": "scxtrimo adapted (from an untrained model)",
}


def log(message: str) -> None:
    """Progress on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _splits_module():
    """``default_model_splits`` from wherever the benchmark folders keep it."""
    for folder in (HERE, HERE.parent, ROOT / "benchmarks", ROOT / "benchmarks" / "evaluation"):
        if (folder / "default_model_splits.py").is_file():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            import default_model_splits

            return default_model_splits
    raise FileNotFoundError(
        f"default_model_splits.py was found neither in {HERE} nor in {ROOT / 'benchmarks'}; "
        "it defines the held-out splits this evaluation uses."
    )


# ------------------------------------------------------------------------------------------
# the user's datasets
# ------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """One split's evaluated cells: counts, labels, reference/held-out rows and batches."""

    name: str
    adata: Any  # AnnData: raw counts in .X, obs "label", "part" and (if any) "batch"
    reference: np.ndarray
    query: np.ndarray
    batch_key: str | None


def _user_dataset(name, source, rows, labels, n_ref, batches) -> Dataset:
    """An AnnData of ``rows`` of ``source`` (counts only) with labels, parts and batches."""
    import anndata as ad
    import pandas as pd

    X = source.X[rows]
    obs = pd.DataFrame(
        {"label": np.asarray(labels).astype(str)},
        index=source.obs_names[rows].astype(str),
    )
    obs["part"] = np.where(np.arange(len(rows)) < n_ref, "reference", "held-out")
    if batches is not None:
        obs["batch"] = pd.Categorical(np.asarray(batches).astype(str))
    obs.index = pd.Index([f"{i}-{c}" for i, c in zip(obs["part"], obs.index, strict=True)])
    adata = ad.AnnData(X=X.copy(), obs=obs, var=pd.DataFrame(index=source.var_names.copy()))
    if "gene_ids" in source.var:
        adata.var["gene_ids"] = source.var["gene_ids"].to_numpy()
    return Dataset(
        name,
        adata,
        np.arange(n_ref),
        np.arange(n_ref, len(rows)),
        "batch" if batches is not None else None,
    )


def datasets(data: Path | None = None, quick: bool = False) -> dict[str, Dataset]:
    """Every split's user dataset: the cells ``evaluate_default_model.py`` evaluates.

    The seeded draws are made in the same order as there, so the cells are the same ones.
    ``quick`` keeps the first :data:`QUICK_REFERENCE` and :data:`QUICK_QUERY` of each part.
    """
    sm = _splits_module()
    batch_columns = {"pbmc4k": None, "kang12k": "batch", "cellbench": "technology"}
    out = {}
    for cells in sm.scored_cells(sm.all_splits(data)):
        ref, query = cells.reference, cells.query
        if quick:
            ref, query = ref[:QUICK_REFERENCE], query[:QUICK_QUERY]
        rows = np.concatenate([ref, query])
        if cells.name == "pbmc4k -> Kang":  # one AnnData of two studies: the study is the batch
            batches = np.repeat(["pbmc4k", "kang"], [len(cells.reference), len(cells.query)])
        else:
            column = batch_columns[cells.name]
            batches = None if column is None else cells.adata.obs[column].to_numpy()
        batches = None if batches is None else batches[rows]
        out[cells.name] = _user_dataset(
            cells.name, cells.adata, rows, cells.labels[rows], len(ref), batches
        )
    return out


# ------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------


def classification_scores(
    embedding: np.ndarray, labels: np.ndarray, reference: np.ndarray, query: np.ndarray
) -> dict[str, float]:
    """kNN (k = 15) and logistic-regression macro-F1: fitted on ``reference``, scored on ``query``.

    As ``evaluate_default_model.py``: Euclidean kNN on the embedding; logistic regression
    (C = 1) on the embedding standardised with the reference cells' means and deviations.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(embedding, dtype=np.float64)
    y = np.asarray(labels).astype(str)
    if not np.isfinite(X[np.concatenate([reference, query])]).all():
        raise ValueError("The embedding has NaN or infinite values in the evaluated cells.")
    y_ref, y_query = y[reference], y[query]
    knn = KNeighborsClassifier(n_neighbors=K_CLASSIFIER).fit(X[reference], y_ref)
    scaler = StandardScaler().fit(X[reference])
    lr = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(X[reference]), y_ref)
    return {
        "knn_macro_f1": float(f1_score(y_query, knn.predict(X[query]), average="macro")),
        "logreg_macro_f1": float(
            f1_score(y_query, lr.predict(scaler.transform(X[query])), average="macro")
        ),
    }


# Batch mixing is scxtrimo's own metric (the same numbers a user gets from scxtrimo.metrics).
batch_entropy = batch_mixing
well_mixed_entropy = well_mixed_batch_mixing


# ------------------------------------------------------------------------------------------
# methods (each runs in its own worker process)
# ------------------------------------------------------------------------------------------


def _dense(X) -> np.ndarray:
    return X.toarray() if hasattr(X, "toarray") else np.asarray(X)


def fit_pca(adata, batch_key: str | None, quick: bool) -> tuple[np.ndarray, float]:
    """PCA-50 of the pca baseline of ``evaluate_default_model.py``, fitted on all the cells."""
    import anndata as ad
    import scanpy as sc
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    work = ad.AnnData(X=adata.X.astype(np.float32))
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    hvg = sc.pp.highly_variable_genes(work, n_top_genes=min(2000, work.n_vars), inplace=False)
    X = _dense(work.X[:, hvg["highly_variable"].to_numpy()])
    X = np.clip(StandardScaler().fit_transform(X), -10, 10)
    n_comps = min(50, X.shape[0] - 1, X.shape[1])
    return PCA(n_comps, random_state=0).fit_transform(X), 0.0


def fit_scvi(adata, batch_key: str | None, quick: bool) -> tuple[np.ndarray, float]:
    """scvi-tools' defaults: 2,000 seurat_v3 HVGs of the counts, ``SCVI(adata).train()``."""
    import scanpy as sc
    import scvi

    scvi.settings.seed = 0
    work = adata.copy()
    # As scvi-tools' tutorials: genes with fewer than 3 counts out (seurat_v3's loess fit
    # fails on all-zero genes), then 2,000 seurat_v3 HVGs of the counts.
    sc.pp.filter_genes(work, min_counts=3)
    work.layers["counts"] = work.X.copy()
    if work.n_vars > 2000:
        sc.pp.highly_variable_genes(
            work, n_top_genes=2000, flavor="seurat_v3", layer="counts", subset=True
        )
    scvi.model.SCVI.setup_anndata(work, layer="counts", batch_key=batch_key)
    model = scvi.model.SCVI(work)
    kwargs = {"max_epochs": QUICK_SCVI_EPOCHS} if quick else {}
    model.train(enable_progress_bar=False, callbacks=[_epoch_logger()], **kwargs)
    log(f"scVI trained {model.history['elbo_train'].shape[0]} epochs")
    t = time.perf_counter()
    latent = model.get_latent_representation()
    return latent, time.perf_counter() - t


def _epoch_logger(every: int = 50):
    """A Lightning callback that logs scVI's progress every ``every`` epochs (no bar)."""
    from lightning.pytorch import Callback

    class EpochLogger(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            epoch = trainer.current_epoch + 1
            if epoch % every == 0:
                log(f"scVI epoch {epoch}/{trainer.max_epochs}")

    return EpochLogger()


def fit_zero_shot(adata, batch_key: str | None, quick: bool) -> tuple[np.ndarray, float]:
    """``scxtrimo.tl.embed`` with the shipped default (the whole time is embedding)."""
    import scxtrimo

    t = time.perf_counter()
    work = adata.copy()
    scxtrimo.tl.embed(work, progress_bar=False)
    return work.obsm["X_scxtrimo"], time.perf_counter() - t


def _adapted(
    adata, model, batch_key: str | None, quick: bool, seed: int = 0
) -> tuple[np.ndarray, float]:
    import scxtrimo

    kwargs = {"max_steps": QUICK_ADAPT_STEPS} if quick else {}
    adapted = scxtrimo.tl.adapt(
        adata, model, batch_key=batch_key, seed=seed, progress_bar=False, **kwargs
    )
    t = time.perf_counter()
    work = adata.copy()
    scxtrimo.tl.embed(work, adapted, key_added="X_adapted", progress_bar=False)
    return work.obsm["X_adapted"], time.perf_counter() - t


def fit_adapted_default(
    adata, batch_key: str | None, quick: bool, seed: int = 0
) -> tuple[np.ndarray, float]:
    """``tl.adapt`` from the shipped default, then ``tl.embed``."""
    return _adapted(adata, None, batch_key, quick, seed)


def untrained_model():
    """An untrained XTrimoGene of the shipped default's configuration and inference settings."""
    from scxtrimo.model import XTrimoGene
    from scxtrimo.model._pretrained import load_default_model

    default = load_default_model()
    model = XTrimoGene(None, config=default.config.replace(cell_head_dim=0), seed=0)
    model.default_max_genes_ = default.default_max_genes_
    model.default_target_depth_ = default.default_target_depth_
    return model


def fit_adapted_untrained(
    adata, batch_key: str | None, quick: bool, seed: int = 0
) -> tuple[np.ndarray, float]:
    """``tl.adapt`` from an untrained model of the default's configuration, then embed."""
    return _adapted(adata, untrained_model(), batch_key, quick, seed)


FITS = {
    "pca": fit_pca,
    "scvi": fit_scvi,
    "zero_shot": fit_zero_shot,
    "adapted_default": fit_adapted_default,
    "adapted_untrained": fit_adapted_untrained,
}
IMPORTS = {  # imported before the memory baseline, so the libraries themselves do not count
    "pca": ("scanpy", "sklearn.decomposition"),
    "scvi": ("scanpy", "scvi"),
    "zero_shot": ("scxtrimo", "scxtrimo.tl", "scxtrimo.model"),
    "adapted_default": ("scxtrimo", "scxtrimo.tl", "scxtrimo.model"),
    "adapted_untrained": ("scxtrimo", "scxtrimo.tl", "scxtrimo.model"),
}


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the peak resident set size (Linux ``clear_refs`` 5); whether it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def worker(
    method: str, dataset: Path, result: Path, batch_key: str | None, quick: bool, seed: int = 0
) -> None:
    """Fit one method on one saved dataset; save its embedding, times and memory."""
    import importlib
    import resource

    import anndata as ad

    for module in IMPORTS[method]:
        importlib.import_module(module)
    if method not in ("pca", "scvi"):
        import scxtrimo

        scxtrimo.settings.progress_bar = False
    adata = ad.read_h5ad(dataset)
    rss_start = _status_kib("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    seeded = {"seed": seed} if method in ADAPT_METHODS else {}
    embedding, embed_s = FITS[method](adata, batch_key, quick, **seeded)
    total_s = time.perf_counter() - t0
    peak = _status_kib("VmHWM") if reset else None
    if peak is None:  # no resettable peak: the process's peak, imports included
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record = {
        "total_s": total_s,
        "fit_s": total_s - embed_s,
        "embed_s": embed_s,
        "peak_rss_mib": peak / 1024,
        "peak_rss_delta_mib": (peak - rss_start) / 1024 if rss_start is not None else None,
        "peak_rss_reset": reset,
    }
    np.save(result.with_suffix(".npy"), np.asarray(embedding, dtype=np.float32))
    result.write_text(json.dumps(record))


SCORES = ("knn_macro_f1", "logreg_macro_f1", "batch_entropy")


def run_method(ds: Dataset, method: str, folder: Path, args) -> dict[str, Any]:
    """Run ``method`` on ``ds`` (once per seed for the adapted methods) and score it here.

    With several ``--seeds``, the record's scores and times are the means over the seeds and
    ``per_seed`` holds each seed's record.
    """
    seeds = list(args.seeds) if method in ADAPT_METHODS else [0]
    runs = [_run_once(ds, method, folder, args, seed) for seed in seeds]
    failed = [r for r in runs if "error" in r]
    if failed or len(runs) == 1:
        return failed[0] if failed else runs[0]
    record = dict(runs[0])
    for key in (*SCORES, "total_s", "fit_s", "embed_s", "peak_rss_delta_mib"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            record[key] = float(np.mean(values))
    record["seeds"] = seeds
    record["per_seed"] = runs
    return record


def _run_once(ds: Dataset, method: str, folder: Path, args, seed: int) -> dict[str, Any]:
    """One fresh worker process for ``method`` with ``seed``; its embedding scored here."""
    dataset = folder / f"{ds.name.replace(' ', '').replace('>', '')}.h5ad"
    if not dataset.exists():
        ds.adata.write_h5ad(dataset)
    result = folder / f"{dataset.stem}_{method}_seed{seed}.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        method,
        "--dataset",
        str(dataset),
        "--result",
        str(result),
        "--threads",
        str(args.threads),
        "--seed",
        str(seed),
    ]
    if ds.batch_key:
        command += ["--batch-key", ds.batch_key]
    if args.quick:
        command.append("--quick")
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env["NUMBA_NUM_THREADS"] = threads
    # Threads that wait sleep instead of spinning: on a shared, loaded machine spinning OpenMP
    # threads made scVI's 2-thread training ~10x slower in CPU time (measured: 13.5 s against
    # 0.7 s of CPU per epoch on pbmc4k).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load = [round(x, 2) for x in os.getloadavg()]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    proc = subprocess.run(command, env=env, check=False)
    if proc.returncode != 0 or not result.exists():
        return {"error": f"the worker exited with {proc.returncode} (its log is above)"}
    record = json.loads(result.read_text())
    embedding = np.load(result.with_suffix(".npy"))
    labels = ds.adata.obs["label"].to_numpy()
    record.update(classification_scores(embedding, labels, ds.reference, ds.query))
    if ds.batch_key:
        batches = ds.adata.obs[ds.batch_key].to_numpy()
        record["batch_entropy"] = batch_entropy(embedding, batches, k=K_MIXING)
    record.update(
        dims=int(embedding.shape[1]),
        started_utc=started,
        load_average_1_5_15=load,
        threads=args.threads,
        seed=seed,
    )
    return record


# ------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "–"


def _num(x: float | None, fmt: str) -> str:
    return format(x, fmt) if x is not None else "–"


def _score(record: dict, key: str) -> str:
    """A score, with its range over seeds when there are several (``mean (min-max)``)."""
    value = record.get(key)
    if value is None:
        return "–"
    runs = [r[key] for r in record.get("per_seed", []) if r.get(key) is not None]
    if len(runs) > 1:
        return f"{value:.3f} ({min(runs):.3f}–{max(runs):.3f})"
    return f"{value:.3f}"


def markdown(results: dict) -> str:
    """One table per split: methods as rows, scores, ratios to PCA, time and memory."""
    lines = [
        "# Adaptation: scxtrimo beside PCA and scVI on the held-out splits",
        "",
        "Every method is fitted on the split's evaluated cells (reference and held-out together, "
        "unlabelled); kNN (k = 15) and logistic-regression classifiers are fitted on the "
        "reference cells' embedding and labels and scored on the held-out cells (macro-F1), as "
        "in `default_model.md`. Batch mixing: mean normalised entropy of the batches among each "
        "cell's 50 nearest neighbours (higher = more mixed; 'perfect' is the value of a fully "
        "mixed embedding). Time: fit + embedding, wall clock; memory: peak RSS minus RSS at the "
        "start of the fit, in a fresh process per method (libraries imported beforehand). "
        f"Command: `{results.get('command', '')}`; {results.get('threads', '?')} threads per "
        "method; each row records its start time and the machine's load average in "
        f"`{NAME}.json`. Adapted rows over several seeds give the mean and, in brackets, the "
        "range over seeds (the seed draws the head's start, the anchors, positives and views).",
        "",
    ]
    for split, block in results["splits"].items():
        mixing = block.get("batch_key") is not None
        title = (
            f"## {split} ({block['n_reference']} reference + {block['n_query']} held-out cells, "
            f"{block['n_genes']} genes"
        )
        if mixing:
            title += f"; {block['n_batches']} batches: {block['batch_description']}"
        lines += [title + ")", ""]
        header = "| method | kNN macro-F1 | kNN / PCA | LR macro-F1 | LR / PCA |"
        rule = "|---|---|---|---|---|"
        if mixing:
            header += f" batch mixing (perfect {block['well_mixed_entropy']:.2f}) |"
            rule += "---|"
        header += " fit s | embed s | total s | total / scVI | peak RSS delta MiB |"
        rule += "---|---|---|---|---|"
        lines += [header, rule]
        methods = block["methods"]
        pca = methods.get("pca", {})
        scvi_time = methods.get("scvi", {}).get("total_s")
        for method in METHODS:
            if method not in methods:
                continue
            r = methods[method]
            if "error" in r:
                lines.append(f"| {METHOD_LABELS[method]} | failed: {r['error']} |")
                continue
            label = METHOD_LABELS[method]
            if r.get("seeds"):
                label += f", mean of seeds {', '.join(map(str, r['seeds']))}"
            row = (
                f"| {label} | {_score(r, 'knn_macro_f1')} | "
                f"{_ratio(r['knn_macro_f1'], pca.get('knn_macro_f1'))} | "
                f"{_score(r, 'logreg_macro_f1')} | "
                f"{_ratio(r['logreg_macro_f1'], pca.get('logreg_macro_f1'))} |"
            )
            if mixing:
                row += f" {_score(r, 'batch_entropy')} |"
            row += (
                f" {r['fit_s']:.1f} | {r['embed_s']:.1f} | {r['total_s']:.1f} | "
                f"{_ratio(r['total_s'], scvi_time)} | {_num(r['peak_rss_delta_mib'], '.0f')} |"
            )
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def write(results: dict, out: Path) -> None:
    """``adaptation.json`` and ``adaptation.md`` under ``out``, each replaced atomically."""
    _atomic_write(out / f"{NAME}.json", json.dumps(results, indent=1) + "\n")
    _atomic_write(out / f"{NAME}.md", markdown(results) + "\n")


def _load_previous(out: Path, quick: bool) -> dict | None:
    path = out / f"{NAME}.json"
    if not path.exists():
        return None
    previous = json.loads(path.read_text())
    if previous.get("quick", False) != quick:
        log(f"{path} holds {'quick' if previous.get('quick') else 'full'} results: replacing it")
        return None
    return previous


def main(argv: list[str] | None = None) -> None:
    """Parse the options; run the workers (or be one)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--splits", nargs="+", default=list(SPLITS), help=f"any of {', '.join(SPLITS)}"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results; with --quick a temporary folder)",
    )
    parser.add_argument("--quick", action="store_true", help="few cells, epochs and steps")
    parser.add_argument("--fresh", action="store_true", help="do not keep earlier results")
    parser.add_argument("--data", type=Path, default=None, help="the shared data folder")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per method")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="seeds of the adapted methods (scores: the mean, with the range)",
    )
    parser.add_argument(
        "--merge-from",
        nargs="+",
        type=Path,
        default=None,
        help="only merge these result files (or folders) into --out, e.g. of runs in parallel",
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch-key", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        worker(args.worker, args.dataset, args.result, args.batch_key, args.quick, args.seed)
        return

    splits = [SPLIT_ALIASES.get(s, s) for s in args.splits]
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        parser.error(f"unknown split(s) {unknown}; choose from {list(SPLITS)}")
    methods = list(args.methods)
    if any(m in ADAPT_METHODS for m in methods):
        import scxtrimo.tl

        if not hasattr(scxtrimo.tl, "adapt"):
            skipped = [m for m in methods if m in ADAPT_METHODS]
            log(f"scxtrimo.tl.adapt does not exist in this checkout yet: skipping {skipped}")
            methods = [m for m in methods if m not in ADAPT_METHODS]
    out = args.out
    if out is None:
        out = Path(tempfile.gettempdir()) / "scxtrimo_adaptation_quick" if args.quick else RESULTS

    if args.merge_from:
        merge(args.merge_from, out, args.quick, args.fresh)
        return

    t0 = time.time()
    log("loading the splits")
    data = datasets(args.data, quick=args.quick)
    previous = None if args.fresh else _load_previous(out, args.quick)
    results = previous or {"splits": {}}
    command = "python benchmarks/evaluation/evaluate_adaptation.py"
    results.update(
        command=command + (" --quick" if args.quick else ""),
        quick=args.quick,
        threads=args.threads,
        cpu_cores=os.cpu_count(),
    )
    with tempfile.TemporaryDirectory(prefix="scxtrimo_adaptation_") as tmp:
        for split in splits:
            ds = data[split]
            batches = ds.adata.obs[ds.batch_key] if ds.batch_key else None
            block = results["splits"].get(split, {"methods": {}})
            block.update(
                n_reference=len(ds.reference),
                n_query=len(ds.query),
                n_genes=int(ds.adata.n_vars),
                batch_key=ds.batch_key,
            )
            if batches is not None:
                counts = batches.value_counts().sort_index()
                block.update(
                    n_batches=len(counts),
                    batch_description=", ".join(f"{b} {n}" for b, n in counts.items()),
                    well_mixed_entropy=well_mixed_entropy(batches.to_numpy()),
                )
            results["splits"][split] = block
            for method in methods:
                log(f"{split} ({ds.adata.n_obs} cells): {method} ...")
                r = run_method(ds, method, Path(tmp), args)
                block["methods"][method] = r
                if "error" in r:
                    log(f"{split}: {method} FAILED: {r['error']}")
                else:
                    mixing = f", batch mixing {r['batch_entropy']:.3f}" if ds.batch_key else ""
                    log(
                        f"{split}: {method} kNN {r['knn_macro_f1']:.3f}, "
                        f"LR {r['logreg_macro_f1']:.3f}{mixing}; {r['total_s']:.1f} s, "
                        f"peak RSS +{_num(r['peak_rss_delta_mib'], '.0f')} MiB"
                    )
                results["splits"] = {s: results["splits"][s] for s in _order(results)}
                write(results, out)  # after every method: a partial run keeps its results
    log(f"done in {(time.time() - t0) / 60:.1f} min: {out / NAME}.md")
    print(markdown(results))


def merge(sources: list[Path], out: Path, quick: bool, fresh: bool) -> None:
    """Merge the entries of other runs' result files into ``out`` (later sources win)."""
    results = (None if fresh else _load_previous(out, quick)) or {"splits": {}}
    for source in sources:
        path = source / f"{NAME}.json" if source.is_dir() else source
        other = json.loads(path.read_text())
        if other.get("quick", False) != quick:
            raise ValueError(f"{path} holds {'quick' if other.get('quick') else 'full'} results.")
        for key in ("command", "quick", "threads", "cpu_cores"):
            results.setdefault(key, other.get(key))
        for split, block in other["splits"].items():
            mine = results["splits"].setdefault(split, {"methods": {}})
            mine.update({k: v for k, v in block.items() if k != "methods"})
            mine["methods"].update(block["methods"])
        log(f"merged {path}")
    results["splits"] = {s: results["splits"][s] for s in _order(results)}
    write(results, out)
    print(markdown(results))


def _order(results: dict) -> list[str]:
    return [s for s in SPLITS if s in results["splits"]]


if __name__ == "__main__":
    main()
