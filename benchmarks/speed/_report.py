"""The benchmark report: markdown tables from ``benchmarks.json``, with the plots of ``_plots``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from _common import loglog_slope
from _plots import GIGA, KERNEL_IMPLS, MODELS, PLOTS, png_name

# ------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------


def fmt(x: float, digits: int = 3) -> str:
    """A number with ``digits`` significant digits and thousands separators."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:,.0f}"
    return f"{x:,.{digits}g}" if abs(x) >= 1 else f"{x:.{digits}g}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown pipe table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def verdict(ok: bool) -> str:
    """Met / missed marker."""
    return "met" if ok else "**missed**"


# ------------------------------------------------------------------------------------------
# derived numbers
# ------------------------------------------------------------------------------------------


def embedding_overall(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Totals of both paths over all bins: time, cells/s, FLOP/s and share of matmul FLOP/s."""
    bins = res["bins"]
    n = sum(b["n_cells"] for b in bins)
    flops = sum(b["encoder_flops"] for b in bins)
    mm = float(np.max([b["matmul_flops_per_s"] for b in bins]))  # best probe: conservative
    out = {}
    for path in ("batched", "one_cell"):
        seconds = sum(b[f"{path}_s"] for b in bins)
        out[path] = {
            "seconds": seconds,
            "cells_per_s": n / seconds,
            "flops_per_s": flops / seconds,
            "matmul_share": flops / seconds / mm,
        }
    out["speedup"] = out["one_cell"]["seconds"] / out["batched"]["seconds"]
    out["matmul_flops_per_s"] = mm
    out["n_cells"] = n
    return out


def deep_bin(res: dict[str, Any]) -> dict[str, float]:
    """FLOP/s of both paths on the deepest bin, as a share of the best matmul probe."""
    b = res["bins"][-1]
    mm = max(x["matmul_flops_per_s"] for x in res["bins"])
    return {
        "mean_tokens": b["mean_tokens"],
        "batched": b["encoder_flops"] / b["batched_s"] / mm,
        "one_cell": b["encoder_flops"] / b["one_cell_s"] / mm,
    }


def pretraining_ratio(res: dict[str, Any], kind: str) -> float:
    """How many times slower per cell than the asymmetric model."""
    return res[kind]["step_s_per_cell"] / res["asymmetric"]["step_s_per_cell"]


def scaling_summary(res: dict[str, Any]) -> dict[str, float]:
    """Growth exponents of time with cells and with tokens, and the memory growth."""
    sizes = res["sizes"]
    cells = np.array([s["n_cells"] for s in sizes], dtype=float)
    seconds = np.array([s["seconds"] for s in sizes])
    rss = np.array([s["peak_rss_mib"] for s in sizes])
    levels = res["depth"]["levels"]
    return {
        "time_vs_cells_slope": loglog_slope(cells, seconds),
        "peak_rss_growth": float(rss[-1] / rss[-2]),
        "peak_rss_growth_first_to_last": float(rss[-1] / rss[0]),
        "time_vs_tokens_slope": loglog_slope(
            np.array([x["mean_tokens"] for x in levels]),
            np.array([x["seconds_per_cell"] for x in levels]),
        ),
        "flops_vs_tokens_slope": loglog_slope(
            np.array([x["mean_tokens"] for x in levels]),
            np.array([x["flops_per_cell"] for x in levels]),
        ),
    }


# ------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------


def header_md(results: dict[str, Any]) -> str:
    """Run and machine description."""
    m = results["machine"]
    loads = [s.get("load_average_section", [[None]])[0][0] for s in results["sections"].values()]
    lines = [
        f"Mode: **{results['mode']}**, command `{results['command']}`, started "
        f"{results['started']}.",
        "",
        f"Machine: {m['cpu_cores']} CPU cores ({m['cpu_model']}), {m['memory_gib']} GiB RAM, "
        f"device {m['device']}; torch {m['torch']} ({_n(m['torch_threads'], 'thread')}), numba "
        f"{m['numba']} ({_n(m['numba_threads'], 'thread')}), numpy {m['numpy']}, scipy {m['scipy']}, "
        f"Python {m['python']}.",
        f"Measured at start: fp32 `torch.mm` 2048² **{fmt(results['matmul_flops_per_s'] / GIGA)} "
        f"GFLOP/s**, `np.copyto` 512 MiB **{fmt(results['copy_bandwidth_bytes_per_s'] / GIGA)} "
        f"GB/s** (read + write).",
        f"Load average (1 min) when each section started: {', '.join(fmt(x) for x in loads if x is not None)} "
        f"on {m['cpu_cores']} cores"
        + (
            " — **the machine was shared with other jobs**, so absolute times are pessimistic; "
            "ratios compare runs made side by side."
            if any(x is not None and x > m["cpu_cores"] for x in loads)
            else "."
        ),
    ]
    seconds = results.get("section_seconds", {})
    if seconds:
        parts = ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
        lines.append(f"Section wall times: {parts} (total {sum(seconds.values()) / 60:.1f} min).")
    for note in results.get("settings", {}).get("notes", []):
        lines.append(f"Note: {note}.")
    return "\n".join(lines)


def targets_md(results: dict[str, Any]) -> str:
    """One row per target of the brief, met or missed."""
    s = results["sections"]
    rows = []
    if "kernel" in s:
        for name, r in s["kernel"]["regimes"].items():
            rows.append(
                [
                    "a. numba >= 3x numpy/scipy, " + name,
                    f"{r['speedup']:.2f}x",
                    verdict(r["speedup"] >= 3),
                ]
            )
    if "embedding" in s:
        for config, need in (("small", 5.0), ("scfoundation", 1.5)):
            if config in s["embedding"]:
                sp = embedding_overall(s["embedding"][config])["speedup"]
                rows.append(
                    [
                        f"b. batched >= {need:g}x one-cell, `{config}`",
                        f"{sp:.2f}x",
                        verdict(sp >= need),
                    ]
                )
        if "scfoundation" in s["embedding"]:
            deep = deep_bin(s["embedding"]["scfoundation"])
            rows.append(
                [
                    f"b. encoder >= 50% of matmul FLOP/s on deep cells (`scfoundation`, {deep['mean_tokens']:.0f} tokens, batched)",
                    f"{deep['batched']:.0%}",
                    verdict(deep["batched"] >= 0.5),
                ]
            )
    if "pretraining" in s:
        ratio = pretraining_ratio(s["pretraining"], "dense")
        rows.append(
            [
                "c. asymmetric >= 10x faster than dense all-gene (per cell)",
                f"{ratio:.1f}x",
                verdict(ratio >= 10),
            ]
        )
    if "scaling" in s:
        sc = scaling_summary(s["scaling"])
        rows.append(
            [
                "d. time ~linear in cells (log-log slope 0.9–1.1)",
                f"slope {sc['time_vs_cells_slope']:.2f}",
                verdict(0.9 <= sc["time_vs_cells_slope"] <= 1.1),
            ]
        )
        rows.append(
            [
                "d. peak RSS flat (largest size <= 1.25x the 10x smaller one)",
                f"{sc['peak_rss_growth']:.2f}x",
                verdict(sc["peak_rss_growth"] <= 1.25),
            ]
        )
    return table(["target", "measured", "verdict"], rows)


def kernel_md(res: dict[str, Any]) -> str:
    """Section a tables."""
    bw = res["copy_bandwidth_bytes_per_s"]
    parts = [
        f"pbmc4k tiled to **{res['n_cells']:,} cells** ({res['nnz']:,} non-zeros, "
        f"{res['mean_tokens_per_cell']:.0f} genes per cell); outputs identical on every batch. "
        f"Memory copy bandwidth in the same process: {fmt(bw / GIGA)} GB/s. Traffic counts the "
        "CSR rows and vocabulary look-ups read and the tokens written (a lower bound).",
    ]
    for name, r in res["regimes"].items():
        rows = []
        for key, label in KERNEL_IMPLS.items():
            x = r[key]
            rows.append(
                [
                    label,
                    fmt(x["median_s"]),
                    fmt(x["cells_per_s"]),
                    fmt(x["nnz_per_s"] / 1e6),
                    fmt(x["bytes_per_s"] / GIGA),
                    f"{x['bytes_per_s'] / bw:.1%}",
                    f"{r['numpy']['median_s'] / x['median_s']:.2f}x",
                ]
            )
        parts.append(
            f"**{name}** — {r['n_batches']:,} batches, {r['mean_cells_per_batch']:.1f} cells each\n\n"
            + table(
                [
                    "implementation",
                    "median pass (s)",
                    "cells/s",
                    "M non-zeros/s",
                    "traffic GB/s",
                    "of copy bandwidth",
                    "speed vs numpy",
                ],
                rows,
            )
        )
    return "\n\n".join(parts)


def embedding_md(res: dict[str, Any]) -> str:
    """Section b tables."""
    parts = []
    for config, r in res.items():
        if not isinstance(r, dict) or "bins" not in r:
            continue
        o = embedding_overall(r)
        mm = o["matmul_flops_per_s"]
        rows = []
        for path, label in (
            ("batched", "batched (`get_latent_representation`)"),
            ("one_cell", "one cell per forward (official)"),
        ):
            mem = r["memory"][path]
            rows.append(
                [
                    label,
                    fmt(o[path]["seconds"]),
                    fmt(o[path]["cells_per_s"]),
                    f"{o['one_cell']['seconds'] / o[path]['seconds']:.2f}x",
                    fmt(o[path]["flops_per_s"] / GIGA),
                    f"{o[path]['matmul_share']:.0%}",
                    fmt(mem["peak_rss_mib"]),
                    fmt(mem["peak_rss_increase_mib"]),
                    fmt(mem["tracemalloc_peak_mib"]),
                ]
            )
        mem = r["memory"]["batched"]
        parts.append(
            f"**`{config}`** ({r['n_parameters']:,} parameters, random weights): {o['n_cells']:,} "
            f"pbmc4k cells; max |batched − one-cell| = {r['max_abs_diff']:.1e}; best matmul "
            f"probe {fmt(mm / GIGA)} GFLOP/s (the reference of the overall shares; the per-group "
            "shares use the probe run just before the group). Memory: each path re-run in a fresh "
            f"process on {mem['n_cells']} of these cells (deepest, {mem['max_tokens_per_cell']:,} "
            "tokens, included).\n\n"
            + table(
                [
                    "path",
                    "time (s)",
                    "cells/s",
                    "speed-up",
                    "encoder GFLOP/s",
                    "of matmul",
                    "peak RSS (MiB)",
                    "RSS increase (MiB)",
                    "numpy heap peak (MiB)",
                ],
                rows,
            )
        )
        parts.append(embedding_bins_md(r))
        if "batch_size_sweep" in r:
            parts.append(batch_sweep_md(r["batch_size_sweep"], config))
    return "\n\n".join(parts)


def batch_sweep_md(sweep: dict[str, Any], config: str) -> str:
    """Time per cell against cells per forward pass (no padding)."""
    per_cell = sweep["seconds_per_cell"]
    one = per_cell["1"]
    rows = [[size, fmt(t * 1e3), f"{one / t:.2f}x"] for size, t in per_cell.items()]
    return (
        f"Batch-size sweep, `{config}`: {sweep['n_cells']} cells of near-equal depth "
        f"({sweep['min_tokens']}–{sweep['max_tokens']} tokens), tokens prebuilt, `encode` + `pool` "
        "only, best of 2 passes — the effect of batching alone, without padding or input "
        "checks.\n\n" + table(["cells per forward", "ms per cell", "speed vs 1 cell"], rows)
    )


def embedding_bins_md(r: dict[str, Any]) -> str:
    """Per-depth-bin speeds and FLOP efficiencies."""
    rows = []
    best = max(b["matmul_flops_per_s"] for b in r["bins"])
    for b in r["bins"]:
        mm = b["matmul_flops_per_s"]
        rows.append(
            [
                f"{b['mean_tokens']:.0f} ({b['min_tokens']}–{b['max_tokens']})",
                b["n_cells"],
                fmt(b["n_cells"] / b["batched_s"]),
                fmt(b["n_cells"] / b["one_cell_s"]),
                f"{b['one_cell_s'] / b['batched_s']:.2f}x",
                f"{fmt(b['encoder_flops'] / b['batched_s'] / GIGA)} ({b['encoder_flops'] / b['batched_s'] / best:.0%})",
                f"{fmt(b['encoder_flops'] / b['one_cell_s'] / GIGA)} ({b['encoder_flops'] / b['one_cell_s'] / best:.0%})",
                fmt(mm / GIGA),
                f"{b['encoder_flops_padded'] / b['encoder_flops'] - 1:.1%}",
                fmt(b.get("input_checks_s", float("nan"))),
            ]
        )
    return table(
        [
            "tokens/cell mean (range)",
            "cells",
            "batched cells/s",
            "one-cell cells/s",
            "speed-up",
            "batched GFLOP/s (of best matmul)",
            "one-cell GFLOP/s (of best matmul)",
            "matmul probe before group (GFLOP/s)",
            "padding FLOPs",
            "input checks (s)",
        ],
        rows,
    )


def pretraining_md(res: dict[str, Any]) -> str:
    """Section c table."""
    rows = []
    n_ref = res["asymmetric"]["n_cells"]
    for kind, label in MODELS.items():
        r = res[kind]
        note = (
            ""
            if r["n_cells"] == n_ref
            else f"batch reduced to {r['n_cells']} cell(s), per-cell time scaled"
        )
        rows.append(
            [
                label,
                r["n_cells"],
                fmt(r["step_s"]),
                fmt(r["step_s_per_cell"]),
                f"{pretraining_ratio(res, kind):.1f}x",
                fmt(r["flops_train_step_per_cell"] / GIGA),
                fmt(r["achieved_flops_per_s"] / GIGA),
                fmt(r["matmul_flops_per_s"] / GIGA),
                fmt(r["peak_rss_increase_mib"]),
                note,
            ]
        )
    a = res["asymmetric"]
    return (
        f"Real pbmc4k cells, scFoundation masking (30% of non-zeros, 3% of zeros, half the cells "
        f"down-sampled), at most 1,024 visible genes per cell: {a['encoder_tokens_per_cell']:.0f} "
        f"encoder tokens (batch padded to {a.get('encoder_padded_width', 0)}) and "
        f"{a['masked_per_cell']:.0f} masked positions per cell on average. "
        "All three models have the `small` encoder's width, depth, heads and feed-forward; the "
        "dense and Performer baselines run it over all 19,266 positions. FLOPs are analytical "
        "(fwd + bwd = 3 x forward); the matmul probe ran in the same process.\n\n"
        + table(
            [
                "model",
                "cells/step",
                "step (s)",
                "per cell (s)",
                "vs asymmetric",
                "GFLOP/cell (train)",
                "achieved GFLOP/s",
                "matmul GFLOP/s",
                "peak RSS increase (MiB)",
                "note",
            ],
            rows,
        )
    )


def scaling_md(res: dict[str, Any]) -> str:
    """Section d tables."""
    sc = scaling_summary(res)
    rows = [_scaling_row(s) for s in res["sizes"]]
    sl = res["slice_of_largest"]
    rows.append(
        _scaling_row(sl, f"{sl['n_cells']:,} via `indices=` of the {sl['file_cells']:,}-cell file")
    )
    sizes = table(
        [
            "cells",
            "file (MiB)",
            "time (s)",
            "cells/s",
            "ms/cell",
            "peak RSS (MiB)",
            "RSS increase (MiB)",
            "numpy heap peak (MiB)",
        ],
        rows,
    )
    levels = res["depth"]["levels"]
    depth_rows = [
        [
            f"{x['rate']:g}",
            fmt(x["mean_nnz"]),
            x["n_cells"],
            fmt(x["seconds_per_cell"] * 1e3),
            f"{x['seconds_per_cell'] / levels[-1]['seconds_per_cell']:.2f}",
            fmt(x["flops_per_cell"] / GIGA),
            fmt(x["flops_per_cell"] / x["seconds_per_cell"] / GIGA),
        ]
        for x in levels
    ]
    depth = table(
        [
            "share of counts kept",
            "non-zero genes/cell (mean)",
            "cells",
            "ms/cell",
            "time vs full depth",
            "GFLOP/cell (model)",
            "achieved GFLOP/s",
        ],
        depth_rows,
    )
    nnz = res["sizes"][0].get("mean_nnz_per_cell", float("nan"))
    return (
        f"`{res['config']}` configuration, package defaults; pbmc4k down-sampled to "
        f"{res['thin_rate']:.0%} of its counts ({nnz:.0f} non-zero genes per cell) and tiled; one "
        "backed `.h5ad` per size, each size in a fresh process. Time grows with a log-log slope "
        f"of **{sc['time_vs_cells_slope']:.2f}** "
        f"against cells (1 = linear); peak RSS of the largest size is "
        f"**{sc['peak_rss_growth']:.2f}x** that of the 10x smaller one "
        f"({sc['peak_rss_growth_first_to_last']:.2f}x the smallest).\n\n"
        + sizes
        + f"\n\nTime per cell against depth ({levels[0]['n_cells']} pbmc4k cells down-sampled to "
        "several shares of their counts, in memory, best of the passes): log-log slope "
        f"**{sc['time_vs_tokens_slope']:.2f}** against tokens per cell, where the FLOP model gives "
        f"{sc['flops_vs_tokens_slope']:.2f} (attention is quadratic in the tokens of a cell).\n\n"
        + depth
    )


def _scaling_row(s: dict[str, Any], label: str | None = None) -> list[Any]:
    return [
        label or f"{s['n_cells']:,}",
        fmt(s["file_mib"]),
        fmt(s["seconds"]),
        fmt(s["cells_per_s"]),
        fmt(s["seconds"] / s["n_cells"] * 1e3),
        fmt(s["peak_rss_mib"]),
        fmt(s["peak_rss_increase_mib"]),
        fmt(s["tracemalloc_peak_mib"]),
    ]


SECTION_MD = {
    "kernel": ("a. Token kernels", kernel_md),
    "embedding": ("b. Cell embedding", embedding_md),
    "pretraining": ("c. Pretraining step", pretraining_md),
    "scaling": ("d. Scaling with cells and depth", scaling_md),
}


def markdown(results: dict[str, Any]) -> str:
    """The whole report."""
    parts = ["# scxtrimo benchmarks", header_md(results), "## Targets", targets_md(results)]
    for name, (title, render) in SECTION_MD.items():
        if name in results["sections"]:
            parts += [
                f"## {title}",
                render(results["sections"][name]),
                f"![{name}]({png_name(name)})",
            ]
    return "\n\n".join(parts) + "\n"


def write_report(results: dict[str, Any], out: Path) -> None:
    """Write ``benchmarks.md`` and one PNG per section present in ``results``."""
    (out / "benchmarks.md").write_text(markdown(results))
    for name, plot in PLOTS.items():
        if name in results["sections"]:
            plot(results["sections"][name], out / png_name(name))
