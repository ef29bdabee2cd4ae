"""Scale-out benchmarks: chunked embedding to zarr, SOMA streaming, 2 processes vs 1.

    python benchmarks/speed/bench_scale_out.py            # ~3-5 min on 2 busy CPU cores
    python benchmarks/speed/bench_scale_out.py --quick    # smaller sizes

Writes ``benchmarks/results/scale_out.json`` and ``scale_out.md``. Every measurement runs in a
fresh process with one torch/numba thread (see docs/performance.md for why), on real PBMCs
(``scxtrimo.datasets.pbmc4k``) tiled to the sizes needed and binomially thinned to shallow
cells (rate 0.1, ~250 gene tokens) so that 20k cells embed in well under a minute with the
``tiny`` configuration. Cost per cell does not depend on the weights (random ``tiny`` model).

1. **Peak RSS of embed_to_store to .zarr at 2k vs 20k cells** (chunks of 512 cells): flat in
   the number of cells is the target (ratio ~1; ``obs`` grows, the embeddings are never held).
   The in-memory ``tl.embed`` of a backed file is measured beside it.
2. **SOMA streaming vs in-memory AnnData**: cells/s of ``embed_to_store`` from a TileDB-SOMA
   experiment against ``tl.embed`` of the same cells in memory.
3. **2 processes vs 1** (``devices=2``, ``ddp_spawn``, gloo): wall time including the start of
   the processes, and cells/s. On a 2-core machine shared with other jobs, expect ~1x.
4. **CPU cells/s of the shipped model** at the data's own depth, for the sizing table; with
   FLOP-based *estimates* for the 100M ``scfoundation`` configuration on GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _common import (  # noqa: E402
    binomial_thin,
    encoder_flops,
    json_default,
    load_average,
    log,
    machine_info,
    memory_probe,
    run_worker,
)

RESULTS = BENCH_DIR.parent / "results"
RATE = 0.1


def _cells(n: int, rate: float = RATE, seed: int = 0):
    """``n`` real PBMCs (tiled when more than 2,170), thinned; obs names made unique."""
    import anndata as ad

    import scxtrimo

    base = scxtrimo.datasets.pbmc4k()
    reps = -(-n // base.n_obs)
    adata = ad.concat([base] * reps, index_unique="-")[:n].copy() if reps > 1 else base[:n].copy()
    adata.X = binomial_thin(adata.X.tocsr(), rate, seed)
    keep = np.asarray(adata.X.sum(axis=1)).ravel() >= 10
    return adata[keep].copy()


def write_input(path: str, n: int) -> dict[str, Any]:
    """Worker: write ``n`` thinned real cells to ``path`` (.h5ad)."""
    adata = _cells(n)
    adata.write_h5ad(path)
    return {"n_cells": int(adata.n_obs), "bytes": Path(path).stat().st_size}


def store_memory(path: str, out: str, chunk_size: int) -> dict[str, Any]:
    """Worker: peak RSS of embed_to_store(path -> out.zarr)."""
    import scxtrimo
    from scxtrimo.model import XTrimoGene

    scxtrimo.settings.progress_bar = False
    model = XTrimoGene(None, config="tiny", seed=0)
    start = time.perf_counter()
    with memory_probe(trace=False) as probe:
        scxtrimo.tl.embed_to_store(path, out, model, chunk_size=chunk_size)
    seconds = time.perf_counter() - start
    import anndata as ad

    n = ad.read_zarr(out).n_obs
    return {**probe.as_dict(), "seconds": seconds, "n_cells": n, "cells_per_s": n / seconds}


def backed_embed_memory(path: str) -> dict[str, Any]:
    """Worker: peak RSS of tl.embed on the backed file (embeddings held in memory)."""
    import anndata as ad

    import scxtrimo
    from scxtrimo.model import XTrimoGene

    scxtrimo.settings.progress_bar = False
    model = XTrimoGene(None, config="tiny", seed=0)
    adata = ad.read_h5ad(path, backed="r")
    start = time.perf_counter()
    with memory_probe(trace=False) as probe:
        scxtrimo.tl.embed(adata, model)
    seconds = time.perf_counter() - start
    return {**probe.as_dict(), "seconds": seconds, "n_cells": int(adata.n_obs)}


def soma_vs_memory(path: str, workdir: str) -> dict[str, Any]:
    """Worker: cells/s from a SOMA experiment (streamed) and from an in-memory AnnData."""
    import anndata as ad
    import tiledbsoma.io

    import scxtrimo
    from scxtrimo.model import XTrimoGene

    scxtrimo.settings.progress_bar = False
    model = XTrimoGene(None, config="tiny", seed=0)
    uri = str(Path(workdir) / "cells.soma")
    tiledbsoma.io.from_h5ad(uri, path, measurement_name="RNA")
    adata = ad.read_h5ad(path)
    scxtrimo.tl.embed(adata[:64].copy(), model)  # compile the kernels before timing
    times: dict[str, list[float]] = {"soma_store": [], "memory_embed": []}
    for i in range(2):  # alternate, so a change in load hits both
        start = time.perf_counter()
        scxtrimo.tl.embed_to_store(uri, Path(workdir) / f"s{i}.zarr", model, chunk_size=2048)
        times["soma_store"].append(time.perf_counter() - start)
        start = time.perf_counter()
        scxtrimo.tl.embed(adata, model)
        times["memory_embed"].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    n = int(adata.n_obs)
    return {
        "n_cells": n,
        "times_s": times,
        "soma_cells_per_s": n / best["soma_store"],
        "memory_cells_per_s": n / best["memory_embed"],
        "soma_over_memory": best["memory_embed"] / best["soma_store"],
    }


def processes(path: str, workdir: str, devices: int) -> dict[str, Any]:
    """Worker: embed_to_store with ``devices`` processes (ddp_spawn on CPU for devices > 1)."""
    import anndata as ad

    import scxtrimo
    from scxtrimo.inference import EmbeddingStore as _Store
    from scxtrimo.model import XTrimoGene

    scxtrimo.settings.progress_bar = False
    model = XTrimoGene(None, config="tiny", seed=0)
    out = Path(workdir) / f"p{devices}.zarr"
    kwargs = {"devices": devices, "accelerator": "cpu"} if devices > 1 else {}
    start = time.perf_counter()
    scxtrimo.tl.embed_to_store(path, out, model, chunk_size=256, **kwargs)
    seconds = time.perf_counter() - start
    n = ad.read_zarr(out).n_obs
    # Steady state: cells committed after each process's first chunk, over the time between
    # its first and last commit (leaves out starting the processes and compiling the kernels).
    done = _Store(out, "X_scxtrimo").done_chunks().values()
    rates = []
    for rank in {d["rank"] for d in done}:
        mine = sorted((d for d in done if d["rank"] == rank), key=lambda d: d["committed_at"])
        span = mine[-1]["committed_at"] - mine[0]["committed_at"]
        rates.append(sum(d["n_rows"] for d in mine[1:]) / span if span > 0 else float("nan"))
    return {
        "devices": devices,
        "seconds": seconds,
        "n_cells": n,
        "cells_per_s": n / seconds,
        "steady_cells_per_s": float(np.sum(rates)),
    }


def shipped_model_speed(n: int) -> dict[str, Any]:
    """Worker: cells/s of the shipped model at the data's own depth (one thread)."""
    import scxtrimo
    from scxtrimo.model._pretrained import load_default_model

    scxtrimo.settings.progress_bar = False
    model = load_default_model()
    adata = scxtrimo.datasets.pbmc4k()[:n].copy()
    model.get_latent_representation(adata[:32].copy())
    prep = model.prepare_input(adata)
    lengths = prep.stats.n_tokens[prep.cells]
    if model.default_max_genes is not None:
        lengths = np.minimum(lengths, model.default_max_genes)
    start = time.perf_counter()
    model.get_latent_representation(adata)
    seconds = time.perf_counter() - start
    return {
        "config": getattr(model.config, "name", None) or "shipped",
        "max_genes": model.default_max_genes,
        "mean_tokens": float(lengths.mean() + 2),
        "n_cells": n,
        "cells_per_s": n / seconds,
    }


def gpu_estimates() -> dict[str, Any]:
    """FLOP-based cells/s estimates for the 100M model on GPUs (not measured)."""
    from scxtrimo.module import get_config

    cfg = get_config("scfoundation")
    # Sustained bf16 dense matmul throughput assumed for a transformer of this width:
    # 35% of the vendor's dense bf16 peak (a guess; measure with benchmarks/speed/gpu_check.py).
    gpus = {"A100 (312 TFLOP/s bf16)": 312e12, "H100 SXM (989)": 989e12, "H200 (989)": 989e12}
    rows = []
    for tokens in (250, 1000, 3000):
        flops = float(encoder_flops(cfg, tokens))
        row = {"tokens_per_cell": tokens, "gflop_per_cell": flops / 1e9}
        for name, peak in gpus.items():
            row[name] = 0.35 * peak / flops
        rows.append(row)
    return {"assumed_fraction_of_peak": 0.35, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    small, large = (500, 5000) if args.quick else (2000, 20000)
    n_soma, n_proc = (500, 1000) if args.quick else (2000, 4000)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "load_average_start": load_average(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mode": "quick" if args.quick else "full",
        "thinning_rate": RATE,
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scxtrimo-scale-") as tmp:
        tmp = Path(tmp)
        inputs = {}
        for n in sorted({small, large, n_soma, n_proc}):
            path = str(tmp / f"cells_{n}.h5ad")
            inputs[n] = path
            results.setdefault("inputs", {})[str(n)] = run_worker(
                "bench_scale_out:write_input", {"path": path, "n": n}, threads=1
            )
        log("1. peak RSS of embed_to_store at two sizes")
        results["memory"] = {}
        for n in (small, large):
            results["memory"][str(n)] = {
                "store": run_worker(
                    "bench_scale_out:store_memory",
                    {"path": inputs[n], "out": str(tmp / f"m{n}.zarr"), "chunk_size": 512},
                    threads=1,
                ),
                "backed_embed": run_worker(
                    "bench_scale_out:backed_embed_memory", {"path": inputs[n]}, threads=1
                ),
            }
        log("2. SOMA streaming vs in-memory AnnData")
        results["soma"] = run_worker(
            "bench_scale_out:soma_vs_memory",
            {"path": inputs[n_soma], "workdir": str(tmp)},
            threads=1,
        )
        log("3. 2 processes vs 1")
        results["processes"] = {
            str(d): run_worker(
                "bench_scale_out:processes",
                {"path": inputs[n_proc], "workdir": str(tmp), "devices": d},
                threads=1,
            )
            for d in (1, 2)
        }
        log("4. shipped model speed, GPU estimates")
        results["shipped_model"] = run_worker(
            "bench_scale_out:shipped_model_speed", {"n": 200 if args.quick else 400}, threads=1
        )
        results["gpu_estimates"] = gpu_estimates()
    results["wall_s"] = time.perf_counter() - t0
    results["load_average_end"] = load_average()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "scale_out.json").write_text(
        json.dumps(results, indent=1, default=json_default)
    )
    (args.out_dir / "scale_out.md").write_text(to_markdown(results))
    print(to_markdown(results))
    return 0


def to_markdown(r: dict[str, Any]) -> str:
    """The tables of docs/scale_out.md from the JSON."""
    m = r["machine"]
    lines = [
        "# Scale-out benchmarks",
        "",
        f"Mode **{r['mode']}**, started {r['started']}, {r['wall_s'] / 60:.1f} min. Machine: "
        f"{m.get('cpu_cores', '?')} CPU cores, one torch/numba thread per process; load average "
        f"{r['load_average_start'][0]:.1f} at start, {r['load_average_end'][0]:.1f} at the end "
        "(shared with other jobs). Real PBMCs thinned to rate "
        f"{r['thinning_rate']} (tiled beyond 2,170 cells); random `tiny` model unless stated.",
        "",
        "## 1. Peak memory: `embed_to_store` to .zarr (chunks of 512 cells)",
        "",
        "| cells | store: peak RSS increase (MiB) | store: cells/s | in-memory `tl.embed` of the backed file: peak RSS increase (MiB) |",
        "|---|---|---|---|",
    ]
    mem = r["memory"]
    sizes = sorted(mem, key=int)
    for n in sizes:
        s, b = mem[n]["store"], mem[n]["backed_embed"]
        lines.append(
            f"| {int(n):,} | {s['peak_rss_increase_mib']:.0f} | {s['cells_per_s']:.0f} | "
            f"{b['peak_rss_increase_mib']:.0f} |"
        )
    a, z = mem[sizes[0]]["store"], mem[sizes[-1]]["store"]
    ratio = z["peak_rss_increase_mib"] / max(a["peak_rss_increase_mib"], 1e-9)
    lines += [
        "",
        f"{int(sizes[-1]) // int(sizes[0])}x the cells: the store's peak RSS increase is "
        f"**{ratio:.2f}x** (flat is 1x).",
        "",
        "## 2. TileDB-SOMA streaming vs in-memory AnnData",
        "",
    ]
    so = r["soma"]
    lines += [
        f"{so['n_cells']:,} cells: SOMA → `embed_to_store` **{so['soma_cells_per_s']:.0f} cells/s**, "
        f"in-memory `tl.embed` **{so['memory_cells_per_s']:.0f} cells/s**: streaming runs at "
        f"**{so['soma_over_memory']:.2f}x** the in-memory speed (best of 2, alternated).",
        "",
        "## 3. Two processes vs one (`devices=2`, `ddp_spawn`, gloo)",
        "",
        "| processes | cells | wall s (incl. process start) | cells/s, end to end | cells/s, steady state |",
        "|---|---|---|---|---|",
    ]
    pr = r["processes"]
    for d in sorted(pr, key=int):
        p = pr[d]
        lines.append(
            f"| {d} | {p['n_cells']:,} | {p['seconds']:.1f} | {p['cells_per_s']:.0f} | "
            f"{p['steady_cells_per_s']:.0f} |"
        )
    speedup = pr["2"]["cells_per_s"] / pr["1"]["cells_per_s"]
    steady = pr["2"]["steady_cells_per_s"] / pr["1"]["steady_cells_per_s"]
    lines += [
        "",
        f"2 processes / 1 process: **{speedup:.2f}x** end to end, **{steady:.2f}x** in the steady "
        "state (between each process's first and last committed chunk), on a 2-core machine "
        "shared with other jobs: a second process finds no idle core here, and end to end it also "
        "pays for starting Python, importing the libraries and compiling the kernels (~20 s).",
        "",
        "## 4. Sizing",
        "",
    ]
    sm = r["shipped_model"]
    lines += [
        f"Measured here: the shipped model (`{sm['config']}`, max_genes {sm['max_genes']}, mean "
        f"{sm['mean_tokens']:.0f} tokens) embeds **{sm['cells_per_s']:.0f} cells/s** on one CPU "
        "thread of this busy machine.",
        "",
        f"**Estimates, not measurements**: the 100M `scfoundation` encoder on GPUs, from its "
        f"analytical FLOPs at {r['gpu_estimates']['assumed_fraction_of_peak']:.0%} of the dense "
        "bf16 peak (run `benchmarks/speed/gpu_check.py` to measure):",
        "",
    ]
    rows = r["gpu_estimates"]["rows"]
    gpus = [k for k in rows[0] if k not in ("tokens_per_cell", "gflop_per_cell")]
    lines.append("| tokens/cell | GFLOP/cell | " + " | ".join(f"{g} cells/s" for g in gpus) + " |")
    lines.append("|---" * (2 + len(gpus)) + "|")
    for row in rows:
        lines.append(
            f"| {row['tokens_per_cell']:,} | {row['gflop_per_cell']:.0f} | "
            + " | ".join(f"{row[g]:,.0f}" for g in gpus)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
