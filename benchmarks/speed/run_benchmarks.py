"""Run scxtrimo's performance benchmarks and write the results.

Usage (from the repository root)::

    python benchmarks/speed/run_benchmarks.py            # full run (about half an hour on 2 cores)
    python benchmarks/speed/run_benchmarks.py --quick    # a few minutes, smaller sizes
    python benchmarks/speed/run_benchmarks.py --sections a c   # only some sections (merged into the JSON)
    python benchmarks/speed/run_benchmarks.py --report-only    # redo tables and plots from the JSON

Sections (each figure is a ratio against a baseline measured in the same run):

a. ``kernel``      numba CSR gather + normalise + pack vs vectorised numpy/scipy.
b. ``embedding``   batched, length-bucketed cell embedding vs one cell per forward pass.
c. ``pretraining`` one AdamW step of the asymmetric model vs all-gene dense / Performer encoders.
d. ``scaling``     embedding time and peak memory vs number of cells (backed .h5ad) and depth.

Writes ``benchmarks.json`` (raw numbers and machine information), ``benchmarks.md`` (tables) and
``*.png`` plots to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    load_average,
    log,
    machine_info,
    run_worker,
    set_threads,
    worker_main,
)

SECTIONS = {"a": "kernel", "b": "embedding", "c": "pretraining", "d": "scaling"}


@dataclass(frozen=True)
class Settings:
    """Problem sizes of a run mode."""

    kernel_cells: int
    kernel_repeats: int
    embedding_groups: dict[str, tuple[int, int | None]]  # config -> (groups, cells per group)
    batch_sweep: dict[str, tuple[int, list[int]]]  # config -> (cells, batch sizes)
    memory_probe_cells: dict[str, int]
    pretraining: dict[str, tuple[int, int, int]]  # kind -> (cells, timed steps, warm-up steps)
    scaling_sizes: tuple[int, ...]
    scaling_thin_rate: float
    depth_rates: tuple[float, ...]
    depth_cells: int
    depth_passes: int
    notes: list[str] = field(default_factory=list)


FULL = Settings(
    kernel_cells=100_000,
    kernel_repeats=3,
    embedding_groups={"small": (8, None), "scfoundation": (4, 6)},
    batch_sweep={"small": (16, [1, 2, 4, 16]), "scfoundation": (4, [1, 4])},
    memory_probe_cells={"small": 32, "scfoundation": 4},
    pretraining={"asymmetric": (8, 5, 1), "performer": (2, 2, 1), "dense": (1, 2, 0)},
    scaling_sizes=(1_000, 10_000, 100_000),
    scaling_thin_rate=0.2,
    depth_rates=(0.05, 0.1, 0.2, 0.35, 0.6, 1.0),
    depth_cells=256,
    depth_passes=2,
)

QUICK = Settings(
    kernel_cells=20_000,
    kernel_repeats=2,
    embedding_groups={"small": (4, 8), "scfoundation": (1, 3)},
    batch_sweep={"small": (8, [1, 8]), "scfoundation": (2, [1, 2])},
    memory_probe_cells={"small": 6, "scfoundation": 3},
    pretraining={"asymmetric": (8, 2, 1), "performer": (2, 1, 0), "dense": (1, 1, 0)},
    scaling_sizes=(1_000, 5_000, 20_000),
    scaling_thin_rate=0.2,
    depth_rates=(0.1, 0.3, 1.0),
    depth_cells=48,
    depth_passes=1,
    notes=["quick mode: smaller sizes, fewer repeats; see the full run for the reported figures"],
)


# ------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------


def run_kernel(settings: Settings, threads: int | None, **_: Any) -> dict[str, Any]:
    """Section a."""
    payload = {"n_cells": settings.kernel_cells, "repeats": settings.kernel_repeats}
    return run_worker("bench_kernel:kernel_benchmark", payload, threads)


def run_embedding(settings: Settings, threads: int | None, **_: Any) -> dict[str, Any]:
    """Section b: timing per configuration, then peak memory per configuration and path."""
    out: dict[str, Any] = {}
    for config, (n_groups, per_group) in settings.embedding_groups.items():
        payload = {
            "config": config,
            "n_groups": n_groups,
            "per_group": per_group,
            "sweep": settings.batch_sweep[config],
        }
        result = run_worker("bench_embedding:embedding_timing", payload, threads)
        result["memory"] = {}
        for path in ("batched", "one_cell"):
            log(f"embedding memory: {config} {path}")
            payload = {
                "config": config,
                "path": path,
                "n_groups": n_groups,
                "per_group": per_group,
                "n_probe": settings.memory_probe_cells[config],
            }
            result["memory"][path] = run_worker(
                "bench_embedding:embedding_memory", payload, threads
            )
        out[config] = result
    return out


def run_pretraining(settings: Settings, threads: int | None, **_: Any) -> dict[str, Any]:
    """Section c: one fresh process per model."""
    out = {}
    for kind, (n_cells, n_steps, warmup) in settings.pretraining.items():
        payload = {"kind": kind, "n_cells": n_cells, "n_steps": n_steps, "warmup": warmup}
        out[kind] = run_worker("bench_pretraining:pretraining_step", payload, threads)
    return out


def run_scaling(settings: Settings, threads: int | None, tmpdir: str | None) -> dict[str, Any]:
    """Section d: one file per size, each embedded backed in a fresh process; depth bins."""
    work = Path(tempfile.mkdtemp(prefix="scxtrimo-scaling-", dir=tmpdir))
    try:
        sizes = []
        for n_cells in settings.scaling_sizes:
            path = str(work / f"pbmc4k_x{n_cells}.h5ad")
            log(f"scaling: writing {n_cells:,} cells")
            written = run_worker(
                "bench_scaling:write_tiled_h5ad",
                {"path": path, "n_cells": n_cells, "thin_rate": settings.scaling_thin_rate},
                threads,
            )
            log(f"scaling: embedding {n_cells:,} cells (backed)")
            result = run_worker("bench_scaling:embed_backed", {"path": path}, threads)
            sizes.append({**result, **{k: written[k] for k in ("write_s", "mean_nnz_per_cell")}})
        log("scaling: smallest size as an indices= slice of the largest file")
        sliced = run_worker(
            "bench_scaling:embed_backed",
            {"path": path, "n_cells": settings.scaling_sizes[0]},
            threads,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log("scaling: cost per cell vs depth")
    depth = run_worker(
        "bench_scaling:embed_by_depth",
        {
            "rates": list(settings.depth_rates),
            "n_cells": settings.depth_cells,
            "passes": settings.depth_passes,
        },
        threads,
    )
    return {
        "config": "tiny",
        "thin_rate": settings.scaling_thin_rate,
        "sizes": sizes,
        "slice_of_largest": sliced,
        "depth": depth,
    }


RUNNERS = {
    "kernel": run_kernel,
    "embedding": run_embedding,
    "pretraining": run_pretraining,
    "scaling": run_scaling,
}


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=sorted(SECTIONS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    parser.add_argument("--threads", type=int, default=None, help="torch/numba threads")
    parser.add_argument("--tmpdir", default=None, help="where section d writes its .h5ad files")
    parser.add_argument("--report-only", action="store_true", help="redo tables and plots")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected sections; merge them into an existing result file of the same mode."""
    settings = QUICK if args.quick else FULL
    json_path = args.out / "benchmarks.json"
    results: dict[str, Any] = {"sections": {}}
    if json_path.exists() and set(args.sections) != set(SECTIONS):
        previous = json.loads(json_path.read_text())
        if previous.get("mode") == ("quick" if args.quick else "full"):
            results = previous
    set_threads(args.threads)
    start = time.perf_counter()
    results.update(
        mode="quick" if args.quick else "full",
        command=" ".join(["python", "benchmarks/speed/run_benchmarks.py", *sys.argv[1:]]),
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
        settings=asdict(settings),
        machine=machine_info(),
        **run_worker("_common:machine_probe", {}, args.threads),
    )
    timings = results.setdefault("section_seconds", {})
    for key in args.sections:
        name = SECTIONS[key]
        log(f"section {key}: {name}")
        section_start = time.perf_counter()
        load_start = load_average()
        results["sections"][name] = RUNNERS[name](settings, args.threads, tmpdir=args.tmpdir)
        results["sections"][name]["load_average_section"] = [load_start, load_average()]
        timings[name] = time.perf_counter() - section_start
        json_path.write_text(json.dumps(results, indent=1))
    results["total_seconds"] = time.perf_counter() - start
    json_path.write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    if args.worker:
        set_threads(args.threads)
        worker_main(args.worker, args.payload, args.worker_output)
        return
    import matplotlib

    matplotlib.use("Agg")
    from _report import write_report

    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((args.out / "benchmarks.json").read_text())
    else:
        results = measure(args)
    write_report(results, args.out)
    log(f"wrote {args.out / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
