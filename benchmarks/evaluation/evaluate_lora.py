"""LoRA fine-tuning (peft) against full fine-tuning: parameters, peak memory and annotation quality.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/evaluation/evaluate_lora.py --out benchmarks/results

Two parts, written to ``lora.json`` / ``lora.md``:

1. **One training step at the 100M configuration** (``XTrimoGene(None, config="scfoundation",
   seed=0)`` plus a classification head; random weights, the compute and memory are those of
   the official checkpoint): ``finetune="full"`` and ``finetune="lora"`` each run in a fresh
   subprocess (so their peak RSS does not mix) on the same few real Kang cells, capped at
   ``--step-max-genes`` gene tokens, through ``model.train(max_steps=1)`` (the whole
   Lightning path: AdamW state, gradients and activations included). Recorded: trainable
   parameters, peak RSS of the process (``ru_maxrss``), RSS after building the model (before
   training) and the step's wall time.
2. **Annotation on the shipped ``small`` default** (``scxtrimo.model.resolve_model(None)``),
   on the split of ``evaluate_annotation.py`` (Kang: train on the six pretraining donors, test
   on the two held out of pretraining, cells subsampled): logistic regression on PCA, then
   ``finetune="head"`` (the linear probe) and, starting from that probe (LP-FT, as in
   ``evaluate_annotation.py``), ``"last_layers"``, ``"full"`` and ``"lora"``. Macro-F1 and
   accuracy on the test cells, each with its wall time (training + prediction; the probe's
   time is in the ``head`` row).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import default_model_splits as splits_mod
import scxtrimo
from _evaluation import load_average, log, machine, quiet, run_record, write_results

HERE = Path(__file__).resolve().parent


def _rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_step(mode: str, n_cells: int, max_genes: int, batch_size: int, checkpointing: bool) -> dict:
    """One training step of ``mode`` at the 100M configuration (run in a fresh process)."""
    import torch

    from scxtrimo.model import XTrimoGene

    quiet()
    # Both modes import peft first (about 10 s and a little memory), so that neither the step
    # time nor the difference in RSS includes the import.
    import peft  # noqa: F401

    torch.manual_seed(0)
    kang = splits_mod.kang_split(splits_mod.data_dir()).adata
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(kang.n_obs, n_cells, replace=False))
    adata = kang[cells].copy()
    model = XTrimoGene(None, config="scfoundation", seed=0)
    model.add_classifier(adata, labels_key="cell_type")
    n_total = sum(p.numel() for p in model.module.parameters())
    rss_model = _rss_mib()
    start = time.perf_counter()
    model.train(
        max_epochs=1,
        max_steps=1,
        finetune=mode,
        batch_size=batch_size,
        max_genes=max_genes,
        train_size=1.0,
        lr=1e-4,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=False,
        gradient_checkpointing=checkpointing,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "mode": mode,
        "gradient_checkpointing": checkpointing,
        "trainable_parameters": int(model.training_args_["trainable_parameters"]),
        "total_parameters": int(n_total),
        "peak_rss_mib": peak,
        "rss_after_model_mib": rss_model,
        "step_seconds": seconds,
        "n_cells": n_cells,
        "batch_size": batch_size,
        "max_genes": max_genes,
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": load_average(),
    }


def memory_part(args) -> dict:
    rows = {}
    for mode, checkpointing in (("full", False), ("lora", False), ("full", True), ("lora", True)):
        name = f"{mode}{' + checkpointing' if checkpointing else ''}"
        log(f"100M: one training step, {name} (fresh process)")
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--step",
            mode,
            "--step-cells",
            str(args.step_cells),
            "--step-max-genes",
            str(args.step_max_genes),
            "--step-batch-size",
            str(args.step_batch_size),
            *(["--step-checkpointing"] if checkpointing else []),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        log(f"  {rows[name]}")
    return rows


def annotation_part(args) -> dict:
    from sklearn.linear_model import LogisticRegression

    from evaluate_annotation import kang_split
    from scxtrimo.metrics import classification_scores, pca_fit_transform
    from scxtrimo.model import XTrimoGene, resolve_model

    adata, train_idx, test_idx, split = kang_split(args.n_train, args.n_test, args.seed)
    train, test = adata[train_idx].copy(), adata[test_idx].copy()
    y_train, y_test = train.obs["cell_type"].astype(str), test.obs["cell_type"].astype(str)
    rows = {}
    log("kang: logistic regression on PCA")
    start = time.perf_counter()
    pc_train, pc_test = pca_fit_transform(train.X, test.X)
    lr = LogisticRegression(max_iter=2000).fit(pc_train, y_train)
    rows["logistic regression on PCA (50 PCs)"] = {
        **classification_scores(y_test, lr.predict(pc_test)),
        "seconds": time.perf_counter() - start,
    }
    common = {
        "n_last_layers": 1,
        "batch_size": args.batch_size,
        "max_genes": args.max_genes,
        "train_size": 0.9,
        "seed": args.seed,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
    }
    tmp = tempfile.TemporaryDirectory(prefix="scxtrimo-lora-")
    probe = Path(tmp.name) / "probe"
    settings = {
        "head": {"max_epochs": args.head_epochs, "lr": args.head_lr},
        "last_layers": {"max_epochs": args.epochs, "lr": args.lr},
        "full": {"max_epochs": args.epochs, "lr": args.full_lr},
        "lora": {
            "max_epochs": args.epochs,
            "lr": args.lora_lr,
            "lora_rank": args.lora_rank,
            "lora_alpha": args.lora_alpha,
        },
    }
    for mode in args.modes:
        log(f"kang: finetune={mode!r} {settings[mode]}")
        start = time.perf_counter()
        if mode == "head":
            model = resolve_model(None)
            model.add_classifier(train.copy(), labels_key="cell_type")
        else:  # LP-FT: from the linear probe
            model = XTrimoGene.load(probe, adata=train.copy())
        model.train(finetune=mode, **settings[mode], **common)
        if mode == "head":
            model.save(probe)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        key = f"ft_{mode}"
        scxtrimo.tl.annotate(test, model, key_added=key, invalid_cells="skip")
        recipe = "" if mode == "head" else " after the linear probe (LP-FT)"
        rows[f"scxtrimo fine-tuned, finetune={mode!r}{recipe}"] = {
            **classification_scores(y_test, test.obs[key].astype(str)),
            "seconds": train_s + time.perf_counter() - start,
            "train_seconds": train_s,
            **{k: v for k, v in settings[mode].items()},
            "trainable_parameters": int(model.training_args_["trainable_parameters"]),
            "total_parameters": int(sum(p.numel() for p in model.module.parameters())),
            "load_average_1_5_15": load_average(),
        }
        log(f"  {rows[list(rows)[-1]]}")
    tmp.cleanup()
    return {
        "split": split,
        "n_train": int(train.n_obs),
        "n_test": int(test.n_obs),
        "n_classes_test": int(y_test.nunique()),
        "epochs": args.epochs,
        "max_genes": args.max_genes,
        "methods": rows,
    }


def _command(argv: list[str]) -> str:
    """The command line that reproduces a part, without where its output went."""
    kept, skip = [], False
    for arg in argv:
        if skip and not arg.startswith("--"):
            continue
        skip = arg in ("--out", "--reuse")
        if not skip:
            kept.append(arg)
    return " ".join(["OMP_NUM_THREADS=1 python benchmarks/evaluation/evaluate_lora.py", *kept])


def memory_lines(result: dict) -> list[str]:
    """The markdown of the one-step memory part."""
    mem = result["one_step_100m"]
    full = mem["full"]
    loads = " / ".join(str(r["load_average_1_5_15"][0]) for r in mem.values())
    lines = [
        f"One training step at the 100M configuration (`scfoundation`, random weights, a "
        f"classification head), {full['batch_size']} real Kang cells per batch capped at "
        f"{full['max_genes']} gene tokens, each run in a fresh process, "
        f"{full['torch_threads']} CPU thread; 1-minute load average at the end of each run "
        f"{loads} (2 shared cores). Command: `{result['one_step_100m_command']}`",
        "",
        "| finetune | trainable parameters | share of all | peak RSS (MiB) | peak / full's | "
        "RSS with the model loaded (MiB) | step time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in mem.items():
        lines.append(
            f"| {name} | {row['trainable_parameters']:,} | "
            f"{row['trainable_parameters'] / row['total_parameters']:.2%} | "
            f"{row['peak_rss_mib']:,.0f} | {row['peak_rss_mib'] / full['peak_rss_mib']:.0%} | "
            f"{row['rss_after_model_mib']:,.0f} | {row['step_seconds']:.1f} |"
        )
    best = mem.get("lora + checkpointing", mem["lora"])
    floor = best["rss_after_model_mib"]
    lines += [
        "",
        f"LoRA trains {best['trainable_parameters'] / full['trainable_parameters']:.2%} of the "
        f"parameters full fine-tuning trains. With gradient checkpointing its peak RSS is "
        f"{best['peak_rss_mib'] / full['peak_rss_mib']:.0%} of full fine-tuning's; the process "
        f"already holds {floor:,.0f} MiB before training (libraries, data and the 100M "
        f"weights, {floor / full['peak_rss_mib']:.0%} of full's peak), and the step adds "
        f"{best['peak_rss_mib'] - floor:,.0f} MiB against "
        f"{full['peak_rss_mib'] - full['rss_after_model_mib']:,.0f} MiB for full fine-tuning "
        f"({(best['peak_rss_mib'] - floor) / (full['peak_rss_mib'] - full['rss_after_model_mib']):.0%}). "
        "Step times are from a shared, heavily loaded machine: compare them only roughly.",
    ]
    return [*lines, ""]


def annotation_lines(result: dict) -> list[str]:
    """The markdown of the annotation part."""
    ann = result["annotation_kang"]
    lines = [
        f"Annotation with the shipped `small` default on Kang ({ann['split']}; "
        f"{ann['n_train']:,} training and {ann['n_test']:,} test cells, subsampled at random; "
        f"{ann['n_classes_test']} classes in the test set), {ann.get('epochs', 2)} epochs for "
        f"last_layers / full / lora, gene tokens capped at {ann.get('max_genes', 256)}. "
        f"Command: `{result['annotation_kang_command']}`",
        "",
        "| method | trainable parameters | accuracy | macro-F1 | time (s) |",
        "|---|---|---|---|---|",
    ]
    for method, r in ann["methods"].items():
        n = f"{r['trainable_parameters']:,}" if "trainable_parameters" in r else "—"
        lines.append(
            f"| {method} | {n} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['seconds']:.0f} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--step", choices=["full", "lora"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--step-cells", type=int, default=8)
    parser.add_argument("--step-batch-size", type=int, default=4)
    parser.add_argument("--step-max-genes", type=int, default=512)
    parser.add_argument("--step-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--reuse",
        type=Path,
        nargs="+",
        default=[],
        help="lora.json files whose parts are reused for the parts skipped here",
    )
    parser.add_argument("--skip-annotation", action="store_true")
    parser.add_argument("--modes", nargs="+", default=["head", "last_layers", "full", "lora"])
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--head-epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=3e-4)
    parser.add_argument("--head-lr", type=float, default=1e-2)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-genes", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.step is not None:
        print(
            json.dumps(
                one_step(
                    args.step,
                    args.step_cells,
                    args.step_max_genes,
                    args.step_batch_size,
                    args.step_checkpointing,
                )
            )
        )
        return
    quiet()
    start = time.perf_counter()
    command = _command(sys.argv[1:])
    result = run_record(
        command,
        {"annotation": "shipped small default", "memory": "scfoundation (100M), random weights"},
    )
    reused = [json.loads(path.read_text()) for path in args.reuse]
    for part, skipped, run in (
        ("one_step_100m", args.skip_memory, memory_part),
        ("annotation_kang", args.skip_annotation, annotation_part),
    ):
        if not skipped:
            result[part] = run(args)
            continue
        for old in reused:
            if part in old:
                result[part] = old[part]
                old_command = old.get(f"{part}_command") or old["command"]
                result[f"{part}_command"] = _command(old_command.split()[3:])
                result[f"{part}_machine"] = old["machine"]
                break
    result.setdefault("one_step_100m_command", command)
    result.setdefault("annotation_kang_command", command)
    lines = []
    if "one_step_100m" in result:
        lines += memory_lines(result)
    if "annotation_kang" in result:
        lines += annotation_lines(result)
    result["total_seconds"] = time.perf_counter() - start
    result["machine_at_end"] = machine()
    write_results(args.out, "lora", result, lines)


if __name__ == "__main__":
    main()
