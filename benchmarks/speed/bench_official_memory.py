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
import json, resource, sys, time
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
encoder = model.module.encoder
runs = [("low", low, {}), ("full", cells, {})]
if hasattr(encoder, "pack_tokens"):  # older code has no packing and no switch
    runs += [("low_padded", low, {"pack": False}), ("low_one_cell", low, {"batch_size": 1})]
for name, data, options in runs:
    encoder.pack_tokens = options.get("pack", True)
    t = time.perf_counter()
    scxtrimo.tl.embed(data, model, batch_size=options.get("batch_size"))
    report[f"{name}_s_per_cell"] = (time.perf_counter() - t) / n
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
        f"model.{k}": (torch.randn(shape, generator=generator) * 0.02)
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
    config_entry = {"model": "mae_autobin", "model_config": {"mae_autobin": model_config}}
    # Three sub-models with their own storage, as in the released file (torch.save would
    # store one shared storage once).
    subs = {
        name: {"config": config_entry, "state_dict": {k: v.clone() for k, v in state.items()}}
        for name in ("gene", "cell", "rde")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(subs, path)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)", flush=True)


def measure(source_root: Path, checkpoint: Path, n_cells: int, threads: int) -> dict:
    """Run the child in a fresh process with ``source_root/src`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(source_root / "src"), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(checkpoint), str(n_cells), str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed ({source_root}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("REPORT "))


def main() -> None:
    """Measure this checkout (and ``--git-ref``), write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--make-checkpoint", action="store_true")
    parser.add_argument("--n-cells", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--git-ref", default=None, help="also measure this commit")
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
        runs["this checkout"] = measure(ROOT, args.checkpoint, args.n_cells, args.threads)
    report = {
        "checkpoint_bytes": args.checkpoint.stat().st_size,
        "n_cells": args.n_cells,
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "runs": runs,
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "official_memory.json").write_text(json.dumps(report, indent=1))
    (args.out / "official_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
