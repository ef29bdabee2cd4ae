"""Cell-type annotation: scxtrimo fine-tuning and label transfer against PCA baselines.

Usage (from the repository root)::

    python benchmarks/evaluation/evaluate_annotation.py --model runs/small_pbmc --out benchmarks/results

Two real datasets, each with one train/test split shared by every method:

1. **Kang 2018 PBMCs** (``kang2018_pbmc_12k_1287genes.h5ad``, 8 donors, 8 cell types, only
   1,287 genes): train on the six donors the default model was pretrained on, test on the two
   donors held out of pretraining (1039, 1244; ``default_model_splits.py``). Cells are
   subsampled (``--n-train``, ``--n-test``, uniformly at random) to keep the run short on 2
   CPU cores.
2. **pbmc4k** (5 labelled types; the ``"?"`` cells are dropped): train on cells of the 90%
   the default model was pretrained on (without labels), test on the 10% held out of
   pretraining.

Methods: fine-tuning a pretrained model with ``finetune="head"``, ``"last_layers"``
(``n_last_layers=1``) and ``"full"`` (predictions by ``scxtrimo.tl.annotate``); by default
``"last_layers"`` and ``"full"`` start from the ``"head"`` model (LP-FT: linear probe, then
fine-tuning; the probe's time is in the ``"head"`` row, or in the control's); label transfer
without training (``scxtrimo.tl.transfer_labels``, k=15 on ``X_scxtrimo``); and two baselines on
the scanpy PCA (fitted on the training cells): logistic regression and kNN (k=15).
Controls use an untrained (randomly initialised) model of the same size, given the same cap on
gene tokens per cell as the model under test: label transfer on its embedding, and
``finetune="full"`` from it (supervised training from scratch, same budget).
Metrics on the test cells: accuracy and macro-F1. Results go to
``evaluate_annotation_<dataset>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import default_model_splits as splits_mod
import scxtrimo
from _evaluation import load_model, log, machine, quiet, run_record, write_results
from scxtrimo.metrics import classification_scores, pca_fit_transform
from scxtrimo.model import XTrimoGene

MODES = ("head", "last_layers", "full")


def subsample(idx: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    if n is None or n >= idx.size:
        return idx
    return np.sort(rng.choice(idx, n, replace=False))


def _labelled(split, n_train, n_test, seed):
    """Training / held-out rows of a pretraining split with a known label, subsampled."""
    adata = split.adata
    known = (adata.obs["cell_type"].astype(str) != "?").to_numpy()
    rng = np.random.default_rng(seed)
    train = subsample(split.train[known[split.train]], n_train, rng)
    test = subsample(split.held_out[known[split.held_out]], n_test, rng)
    return train, test


def kang_split(n_train, n_test, seed):
    split = splits_mod.kang_split(splits_mod.data_dir())
    train, test = _labelled(split, n_train, n_test, seed)
    donors = ", ".join(d.removeprefix("donor") for d in splits_mod.KANG_HELD_OUT_DONORS)
    return split.adata, train, test, f"test donors {donors}, held out of pretraining"


def pbmc_split(n_train, n_test, seed):
    split = splits_mod.pbmc4k_split(splits_mod.data_dir())
    adata = split.adata
    adata.obs["cell_type"] = adata.obs["cell_type"].astype("category")
    train, test = _labelled(split, n_train, n_test, seed)
    return adata, train, test, "test: the 10% held out of pretraining"


def _fresh(model_path, model_info, control, seed, max_genes):
    if control:
        model = XTrimoGene(None, config=model_info["config"], seed=seed + 1)
        # Predict on cells capped as in fine-tuning (an untrained model has no default cap).
        model.default_max_genes = max_genes
        return model
    return load_model(model_path)[0]


def evaluate(name, adata, train_idx, test_idx, split, model_path, args, model_info):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    train, test = adata[train_idx].copy(), adata[test_idx].copy()
    y_train, y_test = train.obs["cell_type"].astype(str), test.obs["cell_type"].astype(str)
    rows = {}

    log(f"{name}: PCA baselines")
    start = time.perf_counter()
    pc_train, pc_test = pca_fit_transform(train.X, test.X)
    lr = LogisticRegression(max_iter=2000).fit(pc_train, y_train)
    rows["logistic regression on PCA (50 PCs)"] = {
        **classification_scores(y_test, lr.predict(pc_test)),
        "seconds": time.perf_counter() - start,
    }
    start = time.perf_counter()
    knn = KNeighborsClassifier(n_neighbors=15).fit(pc_train, y_train)
    rows["kNN (k=15) on PCA (50 PCs)"] = {
        **classification_scores(y_test, knn.predict(pc_test)),
        "seconds": time.perf_counter() - start,
    }

    log(f"{name}: label transfer (no training)")
    pretrained, _ = load_model(model_path)
    start = time.perf_counter()
    scxtrimo.tl.embed(train, pretrained, invalid_cells="skip")
    scxtrimo.tl.embed(test, pretrained, invalid_cells="skip")
    scxtrimo.tl.transfer_labels(test, train, labels_key="cell_type", k=15, key_added="knn")
    rows["scxtrimo label transfer (kNN k=15 on X_scxtrimo)"] = {
        **classification_scores(y_test, test.obs["knn"].astype(str)),
        "seconds": time.perf_counter() - start,
        # How much the embedding varies between cells (a collapsed encoder gives ~0).
        "embedding_feature_sd_median": float(np.median(np.nanstd(train.obsm["X_scxtrimo"], 0))),
    }
    if args.untrained_control:
        log(f"{name}: label transfer with an untrained model (control)")
        untrained = XTrimoGene(None, config=model_info["config"], seed=args.seed + 1)
        # Cells seen the same way as by the pretrained model (its inference cap).
        untrained.default_max_genes = pretrained.default_max_genes
        start = time.perf_counter()
        ref, query = train.copy(), test.copy()
        for data in (ref, query):
            scxtrimo.tl.embed(data, untrained, invalid_cells="skip", key_added="X_untrained")
        scxtrimo.tl.transfer_labels(
            query, ref, labels_key="cell_type", use_rep="X_untrained", key_added="u"
        )
        rows["control: label transfer on an untrained (random) model of the same size"] = {
            **classification_scores(y_test, query.obs["u"].astype(str)),
            "seconds": time.perf_counter() - start,
            "embedding_feature_sd_median": float(np.median(np.nanstd(ref.obsm["X_untrained"], 0))),
        }

    settings = {
        "head": (args.head_epochs, args.head_lr),
        "last_layers": (args.epochs, args.lr),
        "full": (args.epochs, args.full_lr),
    }
    runs = [(mode, False) for mode in args.modes]
    runs += [(mode, True) for mode in args.control_modes]
    probes = {}  # linear probes (finetune="head"), the start of LP-FT
    common = {
        "n_last_layers": 1,
        "batch_size": args.batch_size,
        "max_genes": args.max_genes,
        "train_size": 0.9,
        "seed": args.seed,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
    }
    tmp = tempfile.TemporaryDirectory(prefix="scxtrimo-annotation-")
    for mode, control in runs:
        epochs, lr_mode = settings[mode]
        log(f"{name}: fine-tuning {mode} ({epochs} epochs, lr {lr_mode}), control={control}")
        start = time.perf_counter()
        probe_s = 0.0
        if mode != "head" and args.lp_ft:
            # LP-FT: fit the head as a linear probe first, then fine-tune from it.
            if control not in probes:
                model = _fresh(model_path, model_info, control, args.seed, args.max_genes)
                model.add_classifier(train.copy(), labels_key="cell_type")
                model.train(max_epochs=args.head_epochs, finetune="head", lr=args.head_lr, **common)
                probes[control] = Path(tmp.name) / f"probe{int(control)}"
                model.save(probes[control])
                probe_s = time.perf_counter() - start
            model = XTrimoGene.load(probes[control], adata=train.copy())
        else:
            model = _fresh(model_path, model_info, control, args.seed, args.max_genes)
            model.add_classifier(train.copy(), labels_key="cell_type")
        model.train(max_epochs=epochs, finetune=mode, lr=lr_mode, **common)
        if mode == "head" and args.lp_ft:
            probes[control] = Path(tmp.name) / f"probe{int(control)}"
            model.save(probes[control])
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        key = f"ft_{mode}_{int(control)}"
        scxtrimo.tl.annotate(test, model, key_added=key, invalid_cells="skip")
        hist = model.history
        what = "untrained (random) model" if control else "scxtrimo"
        recipe = " after a linear probe (LP-FT)" if mode != "head" and args.lp_ft else ""
        label = f"{'control: ' if control else ''}{what} fine-tuned, finetune={mode!r}{recipe}"
        rows[label] = {
            **classification_scores(y_test, test.obs[key].astype(str)),
            "seconds": train_s + time.perf_counter() - start,
            "train_seconds": train_s,
            "probe_seconds_included": probe_s,
            "epochs": epochs,
            "lr": lr_mode,
            "trainable_parameters": model.training_args_["trainable_parameters"],
            "final_validation_accuracy": float(hist["validation_accuracy"].iloc[-1, 0]),
        }
    tmp.cleanup()
    return {
        "dataset": name,
        "split": split,
        "n_train": int(train.n_obs),
        "n_test": int(test.n_obs),
        "n_classes_test": int(y_test.nunique()),
        "n_genes": int(adata.n_vars),
        "methods": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--datasets", nargs="+", default=["kang", "pbmc4k"])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--control-modes", nargs="*", default=[])
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--head-epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=3e-4)
    parser.add_argument("--head-lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-genes", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-untrained-control", dest="untrained_control", action="store_false", default=True
    )
    parser.add_argument("--no-lp-ft", dest="lp_ft", action="store_false", default=True)
    args = parser.parse_args()
    quiet()
    _, model_info = load_model(args.model)
    splits = {"kang": kang_split, "pbmc4k": pbmc_split}
    for name in args.datasets:
        start = time.perf_counter()
        adata, train, test, split = splits[name](args.n_train, args.n_test, args.seed)
        res = evaluate(name, adata, train, test, split, args.model, args, model_info)
        parts = [
            "python benchmarks/evaluation/evaluate_annotation.py",
            f"--model {args.model}" if args.model else "",
            f"--datasets {name} --n-train {args.n_train} --n-test {args.n_test}",
            f"--modes {' '.join(args.modes)}" if args.modes != list(MODES) else "",
            f"--control-modes {' '.join(args.control_modes)}" if args.control_modes else "",
            f"--epochs {args.epochs} --head-epochs {args.head_epochs} --lr {args.lr}",
            f"--full-lr {args.full_lr} --head-lr {args.head_lr} --max-genes {args.max_genes}",
            f"--seed {args.seed}",
            "" if args.lp_ft else "--no-lp-ft",
        ]
        command = " ".join(part for part in parts if part)
        total = time.perf_counter() - start
        result = run_record(command, model_info, total_seconds=total, **res)
        lines = [
            f"Cell-type annotation on **{name}** ({res['split']}; {res['n_train']:,} training "
            f"and {res['n_test']:,} test cells, subsampled at random; {res['n_genes']:,} genes; "
            f"{res['n_classes_test']} classes in the test set) with the pretrained "
            f"`{model_info['config']}` model (`{model_info['path']}`"
            f"); {total / 60:.1f} min on {machine()['torch_threads']} CPU threads. "
            f"Command: `{command}`",
            "",
            "| method | accuracy | macro-F1 | time (s) |",
            "|---|---|---|---|",
        ]
        best = max(r["macro_f1"] for r in res["methods"].values())
        for method, r in res["methods"].items():
            f1 = f"**{r['macro_f1']:.3f}**" if r["macro_f1"] == best else f"{r['macro_f1']:.3f}"
            lines.append(f"| {method} | {r['accuracy']:.3f} | {f1} | {r['seconds']:.0f} |")
        write_results(args.out, f"evaluate_annotation_{name}", result, lines)


if __name__ == "__main__":
    main()
