"""Where a training step's time goes, and what adaptation's steps cost beside it.

Usage (from the repository root)::

    python benchmarks/speed/bench_training_step.py [--threads 1] [--steps 8]

Measures, in one run on the shipped default model (``small``) and 640 pbmc4k cells:

1. **Pretraining recipes** (``RECIPES``), one 32-cell step each through ``XTrimoGene.train``:
   the v1 default (``max_genes=256``, read-depth pairs, a second view for InfoNCE,
   masked regression through the Performer decoder, AdamW's per-tensor loop), the same with
   the fused AdamW kernel, neighbour pairs with a cell head (one encoder pass per cell)
   at 256 and 128 genes, then with the decoder on every second step only
   (``regression_every=2``) and 15% instead of 30% of non-zero genes masked. Mean wall time
   per step, split into the forward passes of the encoder and of the decoder, the backward
   pass and the optimiser step (the rest: token preparation and Lightning).
2. **Encoder options** on the same cells, forward + backward per cell: ``max_genes`` 256 vs
   128, and bf16 autocast (CPU).
3. **Adaptation** (``tl.adapt``): the one-off frozen pass per cell, then a step of the cell
   head (``n_layers=0``, 256 anchors) and of head + last encoder layer (``n_layers=1``, 64
   anchors), each per cell-view beside today's pretraining step per cell.

Writes ``benchmarks/results/training_step.json`` and ``.md``. Times depend on the machine's
load (recorded): compare the ratios, which are measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402


def _timed(store: dict, label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        store[label] = store.get(label, 0.0) + time.perf_counter() - start
        return out

    return wrapper


#: The pretraining recipes compared: (label, InfoNCE positives, max_genes, fused AdamW, head).
RECIPES = (  # label, positives, max_genes, fused AdamW, cell head, nonzero_prob, regression_every
    ("v1 default (the baseline): two views, 256 genes, AdamW loop", "views", 256, False, 0, 0.3, 1),
    ("two views, 256 genes, fused AdamW", "views", 256, True, 0, 0.3, 1),
    ("neighbour pairs + cell head, 256 genes (v2 default)", "neighbours", 256, True, 64, 0.3, 1),
    ("neighbour pairs + cell head, 128 genes", "neighbours", 128, True, 64, 0.3, 1),
    ("... + decoder on every 2nd step", "neighbours", 128, True, 64, 0.3, 2),
    (
        "... + 15% of non-zero genes masked (v3 default)",
        "neighbours",
        128,
        True,
        64,
        0.15,
        2,
    ),
)


def pretraining_step(
    adata,
    steps: int,
    positives: str = "views",
    max_genes: int = 256,
    fused: bool = True,
    cell_head_dim: int = 0,
    nonzero_prob: float = 0.3,
    regression_every: int = 1,
) -> dict:
    """One recipe's step, timed by parts over ``steps`` steps (the first two are warm-up).

    ``fused=False`` runs AdamW's per-tensor loop (the optimiser before the fused kernel was
    used), by turning off the plan's check for it.
    """
    from lightning.pytorch.callbacks import Callback

    import scxtrimo.train._plan as plan_module
    from scxtrimo.data import MaskingSpec
    from scxtrimo.model import XTrimoGene

    XTrimoGene.setup_anndata(adata)
    model = XTrimoGene(adata, config="small", seed=0)
    parts: dict[str, float] = {}
    module = model.module
    views = "2 views" if positives == "views" else "1 pass per cell"
    module.encode = _timed(parts, f"encoder forward ({views})", module.encode)
    module.masked_expression = _timed(parts, "decoder forward", module.masked_expression)
    plan_module.info_nce = _timed(parts, "InfoNCE", plan_module.info_nce)

    class Clock(Callback):
        def __init__(self) -> None:
            self.step, self.backward, self.optimizer = [], [], []

        def on_train_batch_start(self, *args):
            self.t0 = time.perf_counter()
            self.parts0 = dict(parts)

        def on_before_backward(self, *args):
            self.tb = time.perf_counter()

        def on_after_backward(self, *args):
            self.backward.append(time.perf_counter() - self.tb)

        def on_before_optimizer_step(self, *args):
            self.to = time.perf_counter()

        def on_train_batch_end(self, *args):
            now = time.perf_counter()
            self.optimizer.append(now - self.to)
            self.step.append(now - self.t0)
            self.parts_step = {k: parts[k] - self.parts0.get(k, 0.0) for k in parts}
            self.history = [*getattr(self, "history", []), self.parts_step]

    clock = Clock()
    can_fuse = plan_module._can_fuse
    if not fused:
        plan_module._can_fuse = lambda groups: False
    if positives != "views":  # the head's cost is timed with the encoder's pooling
        module.cell_embedding = _timed(parts, "cell head", module.cell_embedding)
    try:
        model.train(
            max_steps=steps,
            batch_size=32,
            max_genes=max_genes,
            masking=MaskingSpec(nonzero_prob=nonzero_prob, zero_prob=0.01),
            view_masking=MaskingSpec(zero_prob=0.01, downsample_prob=1.0),
            contrastive_weight=1.0,
            positives=positives,
            cell_head_dim=cell_head_dim,
            regression_every=regression_every,
            train_size=0.98,
            seed=0,
            accelerator="cpu",
            devices=1,
            drop_last=True,
            check_val_every_n_epoch=10**6,
            callbacks=[clock],
            enable_progress_bar=False,
        )
    finally:
        plan_module._can_fuse = can_fuse
        plan_module.info_nce = plan_module.info_nce.__wrapped__
    warm = min(2, len(clock.step) - 1)
    per_part = {
        k: float(np.mean([h.get(k, 0.0) for h in clock.history[warm:]])) for k in clock.history[-1]
    }
    step = float(np.mean(clock.step[warm:]))
    backward = float(np.mean(clock.backward[warm:]))
    optimizer = float(np.mean(clock.optimizer[warm:]))
    per_part["backward"] = backward
    per_part["optimizer step + clipping"] = optimizer
    per_part["other (tokens in the step, Lightning, logging)"] = step - sum(per_part.values())
    return {"seconds_per_step": step, "cells_per_step": 32, "parts": per_part}


def encoder_options(model, adata, repeats: int = 3) -> dict:
    """Encoder forward + backward seconds per cell: max_genes 256 vs 128, fp32 vs bf16."""
    from scxtrimo.data import TokenIndex
    from scxtrimo.data._tokens import inference_batch

    prep = model.prepare_input(adata[:32].copy(), max_genes=256)
    module = model.module.float().train()
    out = {}
    for max_genes in (256, 128):
        spec = type(prep.spec)(**{**prep.spec.__dict__, "max_genes": max_genes})
        tokens = inference_batch(
            prep.matrix,
            np.arange(32),
            prep.mapping.col_to_vocab,
            spec,
            TokenIndex(module.config.n_genes),
        )
        t = {k: torch.from_numpy(v) for k, v in tokens.items()}
        for dtype in ("fp32", "bf16"):
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    h = module.encode(t["gene_index"], t["value"], t["padding_mask"])
                    z = module.pool(h, t["padding_mask"], "all")
                z.float().square().mean().backward()
                module.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
            out[f"max_genes={max_genes}, {dtype}"] = float(np.mean(times[1:]) / 32)
    module.eval()
    return out


def adaptation_steps(model, adata, steps: int) -> dict:
    """The frozen pass per cell, and seconds per step of the two adaptation modes."""
    from scxtrimo.train import AdaptationSpec, adapt_module, cache_frozen_layers, positive_pairs

    out = {}
    prep = model.prepare_input(adata)
    cells = np.unique(prep.cells)
    features = np.random.default_rng(0).normal(size=(len(cells), 10)).astype(np.float32)
    pairs = positive_pairs(features, n_neighbors=5)
    depth = model.config.encoder_depth
    for n_layers, batch in ((0, 256), (1, 64)):
        work = model.copy()
        start = time.perf_counter()
        cache = cache_frozen_layers(
            work.module,
            prep,
            cells,
            depth - n_layers,
            device=torch.device("cpu"),
            progress_bar=False,
        )
        cache_s = time.perf_counter() - start
        spec = AdaptationSpec(n_layers=n_layers, batch_size=batch, max_steps=steps + 2)
        start = time.perf_counter()
        result = adapt_module(work.module, cache, pairs, spec, progress_bar=False)
        per_step = (time.perf_counter() - start) / result.steps
        out[f"n_layers={n_layers}"] = {
            "frozen_pass_seconds_per_cell": cache_s / len(cells),
            "seconds_per_step": per_step,
            "anchors_per_step": batch,
            "seconds_per_cell_view": per_step / (2 * batch),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import scxtrimo

    scxtrimo.settings.progress_bar = False
    scxtrimo.settings.verbosity = "warning"
    pbmc = scxtrimo.datasets.pbmc4k()
    cells = pbmc[np.sort(np.random.default_rng(0).choice(pbmc.n_obs, 640, replace=False))].copy()
    default = scxtrimo.model.resolve_model(None)
    load_before = os.getloadavg()
    recipes = {
        label: pretraining_step(cells.copy(), args.steps, *options) for label, *options in RECIPES
    }
    result = {
        "machine": machine_info(),
        "load_average_before": load_before,
        "torch_threads": torch.get_num_threads(),
        "recipes": recipes,
        "pretraining_step": recipes[RECIPES[0][0]],
        "encoder_options_seconds_per_cell": encoder_options(default, cells),
        "adaptation": adaptation_steps(default, cells, args.steps * 4),
        "load_average_after": os.getloadavg(),
    }
    pre = result["pretraining_step"]
    per_cell = pre["seconds_per_step"] / pre["cells_per_step"]
    lines = [
        "# Training step: where the time goes",
        "",
        f"torch threads {result['torch_threads']}; load average before / after "
        f"{load_before[0]:.1f} / {result['load_average_after'][0]:.1f} (a busy machine "
        "inflates every time; the ratios are measured in the same run).",
        "",
        "## Pretraining recipes: one step of 32 cells",
        "",
        "| recipe | s / step | cheaper than the v1 default |",
        "|---|---|---|",
    ]
    for label, r in recipes.items():
        ratio = pre["seconds_per_step"] / r["seconds_per_step"]
        lines.append(f"| {label} | {r['seconds_per_step']:.3f} | {ratio:.2f}x |")
    for label in (RECIPES[0][0], RECIPES[2][0], RECIPES[-1][0]):
        r = recipes[label]
        lines += [
            "",
            f"### Where the time goes: {label} ({r['seconds_per_step']:.2f} s)",
            "",
            "| part | s / step | share |",
            "|---|---|---|",
        ]
        for name, seconds in r["parts"].items():
            lines.append(f"| {name} | {seconds:.3f} | {seconds / r['seconds_per_step']:.0%} |")
    enc = result["encoder_options_seconds_per_cell"]
    base = enc["max_genes=256, fp32"]
    lines += [
        "",
        "## Encoder forward + backward per cell",
        "",
        "| setting | ms / cell | speed-up vs 256 fp32 |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v * 1e3:.1f} | {base / v:.2f}x |" for k, v in enc.items()]
    lines += [
        "",
        "## Adaptation (tl.adapt) beside the v1 default's pretraining step",
        "",
        "| mode | frozen pass, ms / cell (once) | s / step | ms / cell-view | cheaper per cell than "
        "a pretraining step |",
        "|---|---|---|---|---|",
    ]
    for mode, r in result["adaptation"].items():
        lines.append(
            f"| {mode} ({r['anchors_per_step']} anchors) | "
            f"{r['frozen_pass_seconds_per_cell'] * 1e3:.1f} | {r['seconds_per_step']:.3f} | "
            f"{r['seconds_per_cell_view'] * 1e3:.2f} | "
            f"{per_cell / (2 * r['seconds_per_cell_view']):.0f}x |"
        )
    lines.append("")
    lines.append(
        "A pretraining step's cell is one cell with two views; an adaptation anchor is one cell "
        "with one view plus one view of its positive, so the last column compares two "
        "cell-views with one pretraining cell."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training_step.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "training_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
