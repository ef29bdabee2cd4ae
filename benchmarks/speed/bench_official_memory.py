"""Peak memory and speed of cell embeddings with the 100M scFoundation weights on a CPU.

Usage (from the repository root)::

    python benchmarks/speed/bench_official_memory.py --checkpoint runs/random100m/models.ckpt

With ``--make-checkpoint`` the file is first written: the released 100M configuration
(encoder 768 x 12 layers x 12 heads, Performer decoder 512 x 6) with random weights, in the
official three-sub-model format (``gene``, ``cell``, ``rde``; about 1.4 GB). Random weights
cost what the real ones cost; the real file is ``XTrimoGene.from_scfoundation()``'s download.

Each measurement runs in a fresh Python process (so that its peak resident memory, the
kernel's ``ru_maxrss``, is its own): import scxtrimo, ``XTrimoGene.from_scfoundation`` (the
``cell`` sub-model), then ``tl.embed`` of pbmc4k cells at low depth (down-sampled to ~200
genes) and at full depth (~1,000 genes, capped by the model's ``max_genes``), fp32.
Reported: the peak RSS after import, after loading and after embedding, and the seconds per
cell; at low depth also with the per-token layers on padded batches (``pack_tokens=False``)
and one cell per pass (``batch_size=1``, no padding at all). ``--git-ref REF`` runs the same
measurement on another commit (checked out into a temporary worktree) beside this one, in the
same run.

Writes ``benchmarks/results/official_memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: The child process: load, embed at two depths, print one JSON line.
CHILD = r"""
import json, os, resource, sys, time
import numpy as np

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

report = {}
import scxtrimo
import torch
torch.set_num_threads(int(sys.argv[3]))
scxtrimo.settings.progress_bar = False
scxtrimo.settings.verbosity = "error"
report["after_import_mib"] = peak_mib()
t = time.perf_counter()
model = scxtrimo.model.XTrimoGene.from_scfoundation(sys.argv[1], sha256=None)
report["load_s"] = time.perf_counter() - t
report["after_load_mib"] = peak_mib()
adata = scxtrimo.datasets.pbmc4k()
n = int(sys.argv[2])
rng = np.random.default_rng(0)
cells = adata[np.sort(rng.choice(adata.n_obs, n, replace=False))].copy()
low = cells.copy()
X = low.X.tocsr().astype(np.int64)
X.data = rng.binomial(X.data, 0.08)
X.eliminate_zeros()
low.X = X.astype(np.float32)
scxtrimo.tl.embed(low[:2].copy(), model)  # warm-up: kernels compiled, threads started
encoder = model.module.encoder
runs = [("low", low, {}), ("full", cells, {})]
if hasattr(encoder, "pack_tokens"):  # older code has no packing and no switch
    runs += [("low_padded", low, {"pack": False}), ("low_one_cell", low, {"batch_size": 1})]
    runs += [("low_int8", low, {"precision": "int8"}), ("full_int8", cells, {"precision": "int8"})]
for name, data, options in runs:
    encoder.pack_tokens = options.get("pack", True)
    t = time.perf_counter()
    scxtrimo.tl.embed(
        data, model, batch_size=options.get("batch_size"), precision=options.get("precision", "fp32")
    )
    report[f"{name}_s_per_cell"] = (time.perf_counter() - t) / n
    if name in ("low", "full") and len(sys.argv) > 4:
        np.save(f"{sys.argv[4]}/{name}_ours.npy", data.obsm["X_scxtrimo"])
        if not os.path.exists(f"{sys.argv[4]}/{name}.csv"):  # the official script's input
            data.to_df().to_csv(f"{sys.argv[4]}/{name}.csv")
    genes = np.diff(data.X.tocsr().indptr)
    report[f"{name}_median_genes"] = float(np.median(genes))
    if name == "full":
        report["after_embed_mib"] = peak_mib()
print("REPORT " + json.dumps(report))
"""


def make_checkpoint(path: Path, seed: int = 0) -> None:
    """A random-weight 100M checkpoint in the official format (three sub-models)."""
    import torch

    from scxtrimo.model._scfoundation import scfoundation_state_dict_keys
    from scxtrimo.module import get_config

    config = get_config("scfoundation")
    shapes = scfoundation_state_dict_keys(config)
    generator = torch.Generator().manual_seed(seed)
    state = {
        f"model.{k}": (
            torch.zeros(shape, dtype=torch.long)  # the Performer's redraw counter
            if k.endswith("calls_since_last_redraw")
            else torch.randn(shape, generator=generator) * 0.02
        )
        for k, shape in shapes.items()
    }
    block = {"hidden_dim": 768, "depth": 12, "heads": 12, "dim_head": 64, "seq_len": 19266}
    model_config = {
        "mask_gene_name": False,
        "gene_num": 19266,
        "seq_len": 19266,
        "encoder": {**block, "module_type": "transformer", "norm_first": False},
        "decoder": {
            "hidden_dim": 512,
            "depth": 6,
            "heads": 8,
            "dim_head": 64,
            "seq_len": 19266,
            "module_type": "performer",
            "norm_first": False,
        },
        "n_class": 104,
        "pad_token_id": 103,
        "mask_token_id": 102,
        "bin_num": 100,
        "bin_alpha": 1.0,
        "rawcount": True,
        "model": "mae_autobin",
    }
    # The released file's masking settings (the official loader copies them into its config).
    dataset_config = {
        "bin_type": "auto_bin",
        "value_mask_prob": 0.3,
        "zero_mask_prob": 0.03,
        "replace_prob": 0.8,
        "random_token_prob": 0.1,
        "mask_ignore_token_ids": [0],
        "decoder_add_zero": True,
        "mae_encoder_max_seq_len": 15000,
        "mask_prob": 0.3,
    }
    config_entry = {
        "model": "mae_autobin",
        "model_config": {"mae_autobin": model_config},
        "dataset_config": {"rnaseq": dataset_config},
    }
    # Three sub-models with their own storage, as in the released file (torch.save would
    # store one shared storage once).
    subs = {
        name: {"config": config_entry, "state_dict": {k: v.clone() for k, v in state.items()}}
        for name in ("gene", "cell", "rde")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(subs, path)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)", flush=True)


def measure(
    source_root: Path, checkpoint: Path, n_cells: int, threads: int, save: Path | None = None
) -> dict:
    """Run the child in a fresh process with ``source_root/src`` first on the path.

    ``save``: a folder for the low- and full-depth embeddings and the cells as CSV (the
    official script's input).
    """
    env = {**os.environ, "PYTHONPATH": str(source_root / "src"), "OMP_NUM_THREADS": str(threads)}
    extra = [] if save is None else [str(save)]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(checkpoint), str(n_cells), str(threads), *extra],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed ({source_root}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("REPORT "))


#: Runs a command and prints the peak RSS of its process tree (KiB) and its wall time.
TIMED = r"""
import resource, subprocess, sys, time
t = time.perf_counter()
done = subprocess.run(sys.argv[2:], cwd=sys.argv[1], capture_output=True, text=True)
wall = time.perf_counter() - t
sys.stderr.write(done.stderr[-4000:])
print("RSS", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "WALL", wall, "RC", done.returncode)
"""


def _tqdm_seconds_per_item(stderr: str) -> float | None:
    """Seconds per item of the last tqdm bar in ``stderr`` (its ``s/it`` or ``it/s`` rate)."""
    import re

    found = re.findall(r"([0-9.]+)(s/it|it/s)\]", stderr)
    if not found:
        return None
    value, unit = found[-1]
    return float(value) if unit == "s/it" else 1.0 / float(value)


def run_official(checkout: Path, checkpoint: Path, work: Path, threads: int) -> dict:
    """The official ``model/get_embedding.py`` on the same cells and checkpoint, on a CPU.

    A temporary copy of ``checkout/model`` is patched only where
    ``../shared/reference/official_baseline.md`` says: the ``.cuda()`` calls are removed.
    ``models/models.ckpt`` links to ``checkpoint``. Needs ``pip install einops
    local-attention`` (the official code imports them).
    """
    import numpy as np

    copy = work / "official_model"
    subprocess.run(["cp", "-r", str(checkout / "model"), str(copy)], check=True)
    for name in ("get_embedding.py", "load.py"):
        path = copy / name
        path.write_text(path.read_text().replace(".cuda()", ""))
    (copy / "models").mkdir(exist_ok=True)
    link = copy / "models" / "models.ckpt"
    link.unlink(missing_ok=True)
    link.symlink_to(checkpoint.resolve())
    report = {}
    for depth in ("low", "full"):
        out_dir = work / f"official_{depth}"
        out_dir.mkdir(exist_ok=True)
        command = [
            sys.executable,
            "get_embedding.py",
            "--task_name",
            depth,
            "--input_type",
            "singlecell",
            "--output_type",
            "cell",
            "--pool_type",
            "all",
            "--tgthighres",
            "t4",
            "--pre_normalized",
            "F",
            "--version",
            "ce",
            "--data_path",
            str(work / f"{depth}.csv"),
            "--save_path",
            str(out_dir),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(
            [sys.executable, "-c", TIMED, str(copy), *command],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        line = [x for x in done.stdout.splitlines() if x.startswith("RSS ")]
        fields = line[-1].split() if line else []
        if not fields or fields[5] != "0":
            raise RuntimeError(f"the official script failed:\n{done.stderr[-3000:]}")
        n = len(np.load(work / f"{depth}_ours.npy"))
        official = np.load(next(out_dir.glob("*.npy"))).reshape(n, -1)
        ours = np.load(work / f"{depth}_ours.npy")
        report[depth] = {
            "peak_rss_mib": int(fields[1]) / 1024,
            "wall_s": float(fields[3]),
            "loop_s_per_cell": _tqdm_seconds_per_item(done.stderr),
            "max_abs_difference_to_ours": float(np.abs(official - ours).max()),
        }
    return report


def main() -> None:
    """Measure this checkout (and ``--git-ref``), write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--make-checkpoint", action="store_true")
    parser.add_argument("--n-cells", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--git-ref", default=None, help="also measure this commit")
    parser.add_argument(
        "--official-checkout",
        type=Path,
        default=None,
        help="a clone of biomap-research/scFoundation: run its get_embedding.py side by side",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.make_checkpoint or not args.checkpoint.is_file():
        make_checkpoint(args.checkpoint)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.git_ref:
            tree = Path(tmp) / "ref"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.git_ref],
                check=True,
                capture_output=True,
            )
            try:
                runs[f"{args.git_ref}"] = measure(tree, args.checkpoint, args.n_cells, args.threads)
            finally:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                )
        work = Path(tmp)
        runs["this checkout"] = measure(ROOT, args.checkpoint, args.n_cells, args.threads, work)
        official = None
        if args.official_checkout is not None:
            official = run_official(args.official_checkout, args.checkpoint, work, args.threads)
    report = {
        "checkpoint_bytes": args.checkpoint.stat().st_size,
        "n_cells": args.n_cells,
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "runs": runs,
        "official": official,
        "date": time.strftime("%Y-%m-%d"),
    }
    lines = [
        "# The 100M scFoundation weights on a CPU: peak memory and speed of cell embeddings",
        "",
        f"Random-weight checkpoint in the official format "
        f"({report['checkpoint_bytes'] / 2**30:.2f} GiB, three sub-models; the `cell` one is "
        f"loaded), {args.n_cells} pbmc4k cells at low depth (8% of their counts) and full depth, "
        f"fp32, {args.threads} threads, each run in a fresh process; load average "
        f"{report['load_average'][0]:.1f}. Command: `python benchmarks/speed/"
        f"bench_official_memory.py --checkpoint PATH{' --git-ref ' + args.git_ref if args.git_ref else ''}`.",
        "",
        "| code | peak RSS after import | after loading | after embedding | load s | "
        "s / cell, low depth (median genes) | s / cell, full depth (median genes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['after_import_mib']:.0f} MiB | {r['after_load_mib']:.0f} MiB | "
            f"{r['after_embed_mib']:.0f} MiB | {r['load_s']:.1f} | "
            f"{r['low_s_per_cell']:.3f} ({r['low_median_genes']:.0f}) | "
            f"{r['full_s_per_cell']:.3f} ({r['full_median_genes']:.0f}) |"
        )
    this = runs["this checkout"]
    if "low_padded_s_per_cell" in this:
        lines += [
            "",
            "Low depth, this checkout: packed per-token layers "
            f"{this['low_s_per_cell']:.3f} s / cell, padded {this['low_padded_s_per_cell']:.3f} "
            f"s / cell, one cell per pass {this['low_one_cell_s_per_cell']:.3f} s / cell.",
        ]
    if official:
        lines += [
            "",
            "Side by side with the official `model/get_embedding.py` (its `.cuda()` calls "
            "removed; one cell per forward pass) on the same cells and checkpoint, each a whole "
            "command-line run (imports, reading, loading, embedding); the official time per cell "
            "is its inference loop (tqdm), ours is `tl.embed`:",
            "",
            "| depth | official s / cell | scxtrimo fp32 s / cell | ratio | scxtrimo int8 s / "
            "cell | ratio | official peak RSS | scxtrimo peak RSS (fp32) | largest difference "
            "of the fp32 embeddings |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for depth in ("low", "full"):
            o = official[depth]
            mine, int8 = this[f"{depth}_s_per_cell"], this.get(f"{depth}_int8_s_per_cell")
            theirs = o["loop_s_per_cell"]
            int8_cells = "- | -" if int8 is None else f"{int8:.3f} | {theirs / int8:.2f}x"
            lines.append(
                f"| {depth} ({this[f'{depth}_median_genes']:.0f} genes) | {theirs:.3f} | "
                f"{mine:.3f} | {theirs / mine:.2f}x | {int8_cells} | "
                f"{o['peak_rss_mib']:.0f} MiB | {this['after_embed_mib']:.0f} MiB | "
                f"{o['max_abs_difference_to_ours']:.1e} |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "official_memory.json").write_text(json.dumps(report, indent=1))
    (args.out / "official_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
