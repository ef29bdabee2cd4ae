"""Inference precision: cells/s of fp32, bf16 and int8, and their fidelity to fp32.

Side by side in one run, on this machine's CPU:

* **Speed**: cells/s of the 100M configuration (``XTrimoGene(None, config="scfoundation")``,
  random weights: the released weights are not needed for timing) at three depths. Cells of
  depth ``d`` are real pbmc4k cells with at least ``d`` detected genes, capped at their ``d``
  highest (``max_genes=d``). Each precision embeds the same cells; the order of the precisions
  rotates between repeats and the fastest repeat is kept (the machine is shared).
* **Fidelity**: cosine similarity of each cell's embedding to its fp32 embedding, for the shipped
  default model (all 2,170 pbmc4k cells) and the official-format fixture checkpoint
  (``../shared/fixtures/parity_small/models.ckpt``, the ``cell`` sub-model; 500 pbmc4k cells);
  kNN macro-F1 (k=15, 5-fold, :func:`scxtrimo.metrics.knn_accuracy`) of the default model's
  embeddings against the pbmc4k cell types, per precision.

Writes ``precision.json`` and ``precision.md`` under ``--out``. Run::

    python benchmarks/speed/bench_precision.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import scxtrimo
from scxtrimo.metrics import knn_accuracy
from scxtrimo.model import XTrimoGene, resolve_model

PRECISIONS = ("fp32", "bf16", "int8")
REPO = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """``$SCXTRIMO_SHARED_DATA/..`` or ``../shared`` beside the repository."""
    env = os.environ.get("SCXTRIMO_SHARED_DATA")
    return Path(env).parent if env else REPO.parent / "shared"


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def fidelity(model: XTrimoGene, adata, name: str) -> dict:
    """Cosine of each cell's bf16 / int8 embedding to fp32 (and the embeddings)."""
    emb = {p: model.get_latent_representation(adata, precision=p) for p in PRECISIONS}
    out = {"model": name, "n_cells": int(adata.n_obs)}
    for p in PRECISIONS[1:]:
        c = cosine(emb[p], emb["fp32"])
        out[p] = {
            "share_cos_ge_0.995": float((c >= 0.995).mean()),
            "cos_p5": float(np.percentile(c, 5)),
            "cos_min": float(c.min()),
            "cos_median": float(np.median(c)),
        }
    return out, emb


def speed(adata, depths: list[int], n_cells: int, repeats: int) -> list[dict]:
    """cells/s of the 100M configuration per depth and precision."""
    model = XTrimoGene(None, config="scfoundation", seed=0)
    n_genes = np.asarray((adata.X > 0).sum(1)).ravel()
    rows = []
    for depth in depths:
        cells = np.flatnonzero(n_genes >= depth)[:n_cells]
        if cells.size < n_cells:  # the deepest cells of the data set
            cells = np.argsort(-n_genes, kind="stable")[:n_cells]
        sub = adata[np.sort(cells)].copy()
        tokens = int(np.minimum(n_genes[cells], depth).sum())
        best = {p: np.inf for p in PRECISIONS}
        model.get_latent_representation(sub[:1], max_genes=depth, precision="int8")  # warm-up
        for r in range(repeats):
            order = PRECISIONS[r % 3 :] + PRECISIONS[: r % 3]
            for p in order:
                start = time.perf_counter()
                model.get_latent_representation(sub, max_genes=depth, batch_size=1, precision=p)
                best[p] = min(best[p], time.perf_counter() - start)
        row = {
            "depth": depth,
            "n_cells": int(sub.n_obs),
            "gene_tokens_per_cell": tokens / sub.n_obs,
            "seconds": best,
            "cells_per_s": {p: sub.n_obs / best[p] for p in PRECISIONS},
            "speedup_vs_fp32": {p: best["fp32"] / best[p] for p in PRECISIONS},
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
        rows.append(row)
        print(json.dumps(row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--depths", type=int, nargs="+", default=[500, 1500, 3000])
    parser.add_argument("--cells", type=int, default=3, help="cells per depth (speed)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (fastest kept)")
    parser.add_argument("--fixture-cells", type=int, default=500)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scxtrimo.settings.progress_bar = False
    scxtrimo.settings.verbosity = "warning"
    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.time()
    adata = scxtrimo.datasets.pbmc4k()

    fid = []
    default = resolve_model(None)
    result, emb = fidelity(default, adata, "shipped default (scxtrimo-default)")
    knn = {
        p: knn_accuracy(emb[p], adata.obs["cell_type"].to_numpy(), k=15, n_folds=5, seed=0)[
            "macro_f1"
        ]
        for p in PRECISIONS
    }
    result["knn_macro_f1"] = knn
    fid.append(result)
    print(json.dumps(result))
    ckpt = shared_dir() / "fixtures" / "parity_small" / "models.ckpt"
    if ckpt.is_file():
        fixture = XTrimoGene.from_scfoundation(ckpt, sha256=None)
        cells = np.random.default_rng(0).choice(adata.n_obs, args.fixture_cells, replace=False)
        result, _ = fidelity(
            fixture, adata[np.sort(cells)].copy(), "parity_small fixture (official format)"
        )
        fid.append(result)
        print(json.dumps(result))
    rows = [] if args.skip_speed else speed(adata, args.depths, args.cells, args.repeats)

    command = (
        f"python benchmarks/speed/bench_precision.py --threads {args.threads} --depths "
        f"{' '.join(map(str, args.depths))} --cells {args.cells} --repeats {args.repeats} "
        f"--fixture-cells {args.fixture_cells}" + (" --skip-speed" if args.skip_speed else "")
    )
    report = {
        "command": command,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
            "amx": bool(torch.cpu._is_amx_tile_supported()),
            "vnni": bool(torch.cpu._is_vnni_supported()),
            "platform": platform.platform(),
            "load_average_start": load_start,
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "wall_s": round(time.time() - t0, 1),
        "speed": rows,
        "fidelity": fid,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(report, indent=1))
    (args.out / "precision.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    """The tables of ``docs/performance.md``."""
    m = report["machine"]
    lines = [
        f"Command: `{report['command']}`; {m['cpu_count']} CPU cores, {m['torch_threads']} torch "
        f"threads, torch {m['torch']} (AVX512-BF16: {m['avx512_bf16']}, AMX: {m['amx']}, "
        f"VNNI: {m['vnni']}); load average {m['load_average_start']} at the start, "
        f"{m['load_average_end']} at the end (other jobs on the machine); {report['wall_s']} s.",
        "",
    ]
    if report["speed"]:
        lines += [
            "**Speed**, 100M configuration (random weights), one cell per pass, fastest of the "
            "repeats:",
            "",
            "| gene tokens / cell | cells | fp32 cells/s | bf16 cells/s | int8 cells/s "
            "| bf16 vs fp32 | int8 vs fp32 |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["speed"]:
            c, s = r["cells_per_s"], r["speedup_vs_fp32"]
            lines.append(
                f"| {r['gene_tokens_per_cell']:.0f} | {r['n_cells']} | {c['fp32']:.3f} "
                f"| {c['bf16']:.3f} | {c['int8']:.3f} | {s['bf16']:.2f}x | {s['int8']:.2f}x |"
            )
        lines.append("")
    lines += [
        "**Fidelity** to fp32 (cosine similarity of each cell's embedding):",
        "",
        "| model | cells | precision | share >= 0.995 | 5th percentile | min | kNN macro-F1 "
        "(fp32: same column) |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in report["fidelity"]:
        knn = f.get("knn_macro_f1")
        for p in PRECISIONS[1:]:
            q = f[p]
            k = f"{knn[p]:.4f} (fp32 {knn['fp32']:.4f})" if knn else "-"
            lines.append(
                f"| {f['model']} | {f['n_cells']} | {p} | {q['share_cos_ge_0.995']:.3f} "
                f"| {q['cos_p5']:.5f} | {q['cos_min']:.5f} | {k} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
