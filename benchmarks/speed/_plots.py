"""Matplotlib figures of ``benchmarks.json``, one per section, and the labels tables share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

GIGA = 1e9
KERNEL_IMPLS = {
    "numba": "numba kernels (package, parallel)",
    "numba_serial": "numba kernels, serial twins",
    "numpy": "numpy/scipy vectorised (baseline)",
}
MODELS = {
    "asymmetric": "asymmetric xTrimoGene (`small`)",
    "dense": "dense transformer, all genes (SDPA)",
    "performer": "Performer encoder, all genes (scBERT-style)",
}


# ------------------------------------------------------------------------------------------
# plots, one per section
# ------------------------------------------------------------------------------------------


def plot_kernel(res: dict[str, Any], path: Path) -> None:
    """Cells/s and traffic of each implementation per batch regime."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    regimes = list(res["regimes"])
    x = np.arange(len(regimes))
    for i, (key, label) in enumerate(KERNEL_IMPLS.items()):
        cells = [res["regimes"][r][key]["cells_per_s"] for r in regimes]
        traffic = [res["regimes"][r][key]["bytes_per_s"] / GIGA for r in regimes]
        axes[0].bar(x + (i - 1) * 0.27, cells, 0.27, label=label)
        axes[1].bar(x + (i - 1) * 0.27, traffic, 0.27, label=label)
    axes[1].axhline(
        res["copy_bandwidth_bytes_per_s"] / GIGA, color="k", ls="--", label="np.copyto bandwidth"
    )
    for ax, ylabel in zip(axes, ("cells / s", "compulsory traffic (GB/s)")):
        ax.set_xticks(x, [r.split(" (")[0] for r in regimes])
        ax.set_ylabel(ylabel)
    axes[1].set_yscale("log")
    axes[0].set_ylim(top=axes[0].get_ylim()[1] * 1.35)  # room for the legend
    axes[1].set_ylim(top=axes[1].get_ylim()[1] * 8)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"a. Tokens from CSR rows ({res['n_cells']:,} pbmc4k cells)")
    _save(fig, path)


def plot_embedding(res: dict[str, Any], path: Path) -> None:
    """Cells/s and share of matmul FLOP/s per depth bin, both paths, each configuration."""
    import matplotlib.pyplot as plt

    configs = [c for c, r in res.items() if isinstance(r, dict) and "bins" in r]
    fig, axes = plt.subplots(2, len(configs), figsize=(5.5 * len(configs), 7), squeeze=False)
    for j, config in enumerate(configs):
        bins = res[config]["bins"]
        best = max(b["matmul_flops_per_s"] for b in bins)
        tokens = [b["mean_tokens"] for b in bins]
        for kind, label, marker in (
            ("batched", "batched", "o"),
            ("one_cell", "one cell / forward", "s"),
        ):
            speed = [b["n_cells"] / b[f"{kind}_s"] for b in bins]
            share = [b["encoder_flops"] / b[f"{kind}_s"] / best for b in bins]
            axes[0, j].plot(tokens, speed, marker=marker, label=label)
            axes[1, j].plot(tokens, np.array(share) * 100, marker=marker, label=label)
        axes[0, j].set_yscale("log")
        axes[0, j].set_title(f"`{config}`")
        axes[0, j].set_ylabel("cells / s")
        axes[1, j].axhline(50, color="k", ls=":", label="50% target")
        axes[1, j].set_ylabel("encoder FLOP/s, % of best matmul probe")
        axes[1, j].set_xlabel("tokens per cell (depth-bin mean)")
        axes[0, j].legend(fontsize=8)
        axes[1, j].legend(fontsize=8)
    fig.suptitle("b. Cell embedding: batched vs one cell per forward pass")
    _save(fig, path)


def plot_pretraining(res: dict[str, Any], path: Path) -> None:
    """Seconds per cell of a training step, with analytical FLOPs."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    kinds = list(MODELS)
    per_cell = [res[k]["step_s_per_cell"] for k in kinds]
    bars = ax.bar([MODELS[k].split(" (")[0] for k in kinds], per_cell, color=["C2", "C3", "C1"])
    for bar, kind in zip(bars, kinds):
        gflop = res[kind]["flops_train_step_per_cell"] / GIGA
        ax.annotate(
            f"{gflop:,.0f} GFLOP/cell",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_yscale("log")
    ax.set_ylabel("training step time per cell (s)")
    ax.set_title("c. Pretraining step (fwd + bwd + AdamW), `small` width/depth")
    _save(fig, path)


def plot_scaling(res: dict[str, Any], path: Path) -> None:
    """Time and peak RSS against cells; time per cell against depth."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    cells = np.array([s["n_cells"] for s in res["sizes"]], dtype=float)
    seconds = np.array([s["seconds"] for s in res["sizes"]])
    axes[0].loglog(cells, seconds, "o-", label="measured")
    axes[0].loglog(cells, seconds[0] * cells / cells[0], "k:", label="linear from first point")
    axes[0].set_xlabel("cells")
    axes[0].set_ylabel("embedding time (s)")
    axes[0].legend(fontsize=8)
    axes[1].semilogx(cells, [s["peak_rss_mib"] for s in res["sizes"]], "o-", label="peak RSS")
    axes[1].semilogx(
        cells, [s["rss_before_mib"] for s in res["sizes"]], "s--", label="RSS before embedding"
    )
    axes[1].set_ylim(bottom=0)
    axes[1].set_xlabel("cells")
    axes[1].set_ylabel("MiB")
    axes[1].legend(fontsize=8)
    levels = res["depth"]["levels"]
    tokens = np.array([x["mean_tokens"] for x in levels])
    per_cell = np.array([x["seconds_per_cell"] for x in levels]) * 1e3
    flops = np.array([x["flops_per_cell"] for x in levels])
    axes[2].loglog(tokens, per_cell, "o-", label="measured")
    axes[2].loglog(tokens, flops * per_cell[-1] / flops[-1], "k:", label="FLOP model (scaled)")
    axes[2].loglog(tokens, tokens * per_cell[-1] / tokens[-1], "C2--", label="linear (scaled)")
    axes[2].set_xlabel("tokens per cell")
    axes[2].set_ylabel("ms per cell")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"d. Scaling, `{res['config']}` config, backed .h5ad")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


PLOTS = {
    "kernel": plot_kernel,
    "embedding": plot_embedding,
    "pretraining": plot_pretraining,
    "scaling": plot_scaling,
}


def png_name(section: str) -> str:
    """File name of a section's plot."""
    return f"benchmark_{section}.png"
