"""GPU readiness check: parity, bf16, throughput, memory, a DDP smoke run (<= 5 min on one GPU).

Run on a machine with a CUDA GPU, from the repository root:

    python benchmarks/speed/gpu_check.py                 # everything, ~2-5 min on one GPU
    python benchmarks/speed/gpu_check.py --quick         # fewer cells (~1 min)

Without CUDA it stops at once with a message (exit code 2). ``--device cpu`` runs the same
functions on the CPU with small sizes (what ``tests/test_gpu_check.py`` does, so this script
cannot rot). Results: ``benchmarks/results/gpu_check.json`` and ``.md`` (``--out-dir``).

What it measures:

1. **Parity**: the official-format fixture ``tests/data/parity_small`` (the ``cell`` model),
   embedded in fp32 on the device and on the CPU; max |difference| must be <= 1e-4 (and both
   match the official outputs stored in ``parity.npz``).
2. **bf16 autocast**: the same cells with ``autocast=True`` against fp32: max and relative
   deviation, lowest cosine similarity.
3. **SDPA**: the encoder's attention goes through ``torch.nn.functional.
   scaled_dot_product_attention`` (calls counted); which fused backends accept its boolean
   padding mask.
4. **Host synchronisation** in ``get_latent_representation``: CUDA sync debug mode counts the
   synchronising calls over a run of many batches (expected: one device-to-host copy per batch).
5. **Throughput**: cells/s of the 100M ``scfoundation`` configuration (random weights: the cost
   does not depend on them) on real PBMCs at three read depths (binomially thinned), with the
   analytical encoder FLOPs, achieved TFLOP/s and peak GPU memory.
6. **DDP smoke**: a few training steps of the ``tiny`` model with ``strategy="ddp"`` on one
   device (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "speed"))
FIXTURE = ROOT / "tests" / "data" / "parity_small"
RESULTS = ROOT / "benchmarks" / "results"
PARITY_TOLERANCE = 1e-4


def _require_cuda(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.stderr.write(
            "gpu_check: CUDA is not available (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a machine "
            "with a CUDA GPU and a CUDA build of PyTorch, or pass --device cpu for the small "
            "CPU smoke run.\n"
        )
        raise SystemExit(2)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _fixture_adata():
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    p = dict(np.load(FIXTURE / "parity.npz", allow_pickle=False))
    X = sp.csr_matrix(
        (
            p["input_user_counts_data"],
            p["input_user_counts_indices"],
            p["input_user_counts_indptr"],
        ),
        shape=tuple(p["input_user_counts_shape"]),
    )
    adata = ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=p["input_cell_ids"].astype(str)),
        var=pd.DataFrame(index=p["input_user_gene_names"].astype(str)),
    )
    return adata, p


def parity_check(device: str) -> dict[str, Any]:
    """fp32 embeddings of the official-format fixture on ``device`` vs the CPU."""
    from scxtrimo.model import XTrimoGene

    adata, p = _fixture_adata()
    model = XTrimoGene.from_scfoundation(FIXTURE / "models.ckpt", checkpoint="cell")
    cpu = model.get_latent_representation(adata, device="cpu")
    dev = model.get_latent_representation(adata, device=device, autocast=False)
    diff = float(np.abs(dev - cpu).max())
    official = p["out_cell_ce_all_t4_F"]
    return {
        "n_cells": int(adata.n_obs),
        "max_abs_device_vs_cpu": diff,
        "max_abs_device_vs_official": float(np.abs(dev - official).max()),
        "max_abs_cpu_vs_official": float(np.abs(cpu - official).max()),
        "tolerance": PARITY_TOLERANCE,
        "passed": diff <= PARITY_TOLERANCE,
    }


def bf16_check(device: str, config: str = "scfoundation", n_cells: int = 256) -> dict[str, Any]:
    """bf16 autocast against fp32 on the same cells (autocast only acts on CUDA)."""
    from scxtrimo.model import XTrimoGene

    adata = _pbmc(n_cells)
    model = XTrimoGene(None, config=config, seed=0)
    fp32 = model.get_latent_representation(adata, device=device, autocast=False)
    bf16 = model.get_latent_representation(adata, device=device, autocast=True)
    num = (fp32 * bf16).sum(1)
    cos = num / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    return {
        "config": config,
        "n_cells": int(adata.n_obs),
        "autocast_active": device.startswith("cuda"),
        "max_abs": float(np.abs(bf16 - fp32).max()),
        "relative_l2": float(np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)),
        "min_cosine": float(cos.min()),
    }


def sdpa_check(device: str) -> dict[str, Any]:
    """Count SDPA calls in one encode; try the fused backends with the padding mask."""
    import torch
    import torch.nn.functional as F

    from scxtrimo.module import XTrimoGeneModule, get_config

    module = XTrimoGeneModule(get_config("tiny")).to(device).eval()
    B, L = 4, 64
    gene_index = torch.randint(0, 19264, (B, L), device=device)
    value = torch.rand(B, L, device=device)
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    mask[0, 40:] = True
    calls = {"n": 0}
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        with torch.inference_mode():
            module.encode(gene_index, value, mask)
    finally:
        F.scaled_dot_product_attention = original
    out: dict[str, Any] = {
        "sdpa_calls_per_encode": calls["n"],
        "encoder_layers": module.config.encoder_depth,
        "uses_sdpa": calls["n"] == module.config.encoder_depth,
    }
    if device.startswith("cuda"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in [
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("math", SDPBackend.MATH),
        ]:
            try:
                with (
                    sdpa_kernel(backend),
                    torch.inference_mode(),
                    torch.autocast("cuda", torch.bfloat16),
                ):
                    module.encode(gene_index, value, mask)
                out[f"backend_{name}"] = "ok"
            except RuntimeError as err:
                out[f"backend_{name}"] = f"refused: {str(err).splitlines()[0][:120]}"
    return out


def host_sync_check(device: str, n_cells: int = 256) -> dict[str, Any]:
    """Synchronising CUDA calls during get_latent_representation (sync debug mode)."""
    import torch

    from scxtrimo.model import XTrimoGene

    adata = _pbmc(n_cells)
    model = XTrimoGene(None, config="tiny", seed=0)
    n_batches = len(_plan(model, adata, max_tokens=4096))
    out: dict[str, Any] = {"n_cells": n_cells, "n_batches": n_batches}
    if not device.startswith("cuda"):
        out["note"] = "sync debug mode needs CUDA; only the batch count was taken"
        return out
    model.get_latent_representation(adata, device=device, max_tokens=4096)  # warm-up
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.get_latent_representation(adata, device=device, max_tokens=4096)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    out["sync_warnings"] = len(syncs)
    out["sync_warnings_per_batch"] = len(syncs) / max(n_batches, 1)
    out["examples"] = sorted(set(syncs))[:5]
    return out


def _pbmc(n_cells: int, rate: float = 1.0, seed: int = 0):
    import scxtrimo
    from _common import binomial_thin

    adata = scxtrimo.datasets.pbmc4k()
    idx = np.random.default_rng(seed).choice(adata.n_obs, min(n_cells, adata.n_obs), replace=False)
    adata = adata[np.sort(idx)].copy()
    if rate < 1.0:
        adata.X = binomial_thin(adata.X.tocsr(), rate, seed)
    keep = np.asarray(adata.X.sum(axis=1)).ravel() >= 10
    return adata[keep].copy()


def _plan(model, adata, max_tokens: int):
    from scxtrimo.data._loading import plan_batches

    prep = model.prepare_input(adata)
    return plan_batches(prep.stats.n_tokens[prep.cells], max_tokens=max_tokens)


def throughput(
    device: str,
    config: str = "scfoundation",
    n_cells: int = 1024,
    rates: tuple[float, ...] = (1.0, 0.3, 0.1),
    max_tokens: int = 65_536,
) -> dict[str, Any]:
    """cells/s, tokens/cell, TFLOP/s and peak memory at three read depths."""
    import torch

    from _common import encoder_flops
    from scxtrimo.model import XTrimoGene

    model = XTrimoGene(None, config=config, seed=0)
    model.module.to(device)
    n_params = sum(p.numel() for p in model.module.encoder.parameters())
    warm = _pbmc(min(64, n_cells))
    model.get_latent_representation(warm, device=device, max_tokens=max_tokens)
    rows = []
    for rate in rates:
        adata = _pbmc(n_cells, rate=rate, seed=1)
        prep = model.prepare_input(adata)
        tokens = prep.stats.n_tokens[prep.cells] + 2
        flops = float(np.sum(encoder_flops(model.config, tokens)))
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        _sync(device)
        start = time.perf_counter()
        model.get_latent_representation(adata, device=device, max_tokens=max_tokens)
        _sync(device)
        seconds = time.perf_counter() - start
        row = {
            "rate": rate,
            "n_cells": int(adata.n_obs),
            "mean_tokens": float(tokens.mean()),
            "max_tokens_per_cell": int(tokens.max()),
            "seconds": seconds,
            "cells_per_s": adata.n_obs / seconds,
            "encoder_gflop_per_cell": flops / adata.n_obs / 1e9,
            "achieved_tflop_s": flops / seconds / 1e12,
        }
        if device.startswith("cuda"):
            row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
            row["peak_gpu_mib_above_weights"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append(row)
    return {
        "config": config,
        "encoder_parameters": int(n_params),
        "max_tokens_budget": max_tokens,
        "rows": rows,
    }


def ddp_smoke(device: str, steps: int = 5) -> dict[str, Any]:
    """A few training steps of the tiny model with strategy='ddp' on one device."""
    import torch

    from scxtrimo.model import XTrimoGene

    adata = _pbmc(128)
    XTrimoGene.setup_anndata(adata)
    model = XTrimoGene(adata, config="tiny", seed=0)
    before = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    start = time.perf_counter()
    model.train(
        max_epochs=1,
        batch_size=16,
        max_genes=256,
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        strategy="ddp",
        max_steps=steps,
        train_size=1.0,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
    )
    seconds = time.perf_counter() - start
    after = model.module.state_dict()
    changed = sum(
        not torch.equal(before[k], after[k].detach().to(before[k].device)) for k in before
    )
    losses = model.history.get("train_loss_epoch") if getattr(model, "history", None) else None
    return {
        "steps": steps,
        "seconds": seconds,
        "tensors_changed": int(changed),
        "n_tensors": len(before),
        "passed": changed > 0,
        "final_train_loss": None if losses is None else float(np.asarray(losses).ravel()[-1]),
    }


def run_all(device: str, quick: bool = False, small: bool = False) -> dict[str, Any]:
    """Every check; ``small`` uses the tiny config and few cells (CPU smoke)."""
    import torch

    import scxtrimo

    scxtrimo.settings.progress_bar = False
    config = "tiny" if small else "scfoundation"
    n = 32 if small else (256 if quick else 1024)
    results: dict[str, Any] = {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mode": "small" if small else ("quick" if quick else "full"),
    }
    checks = [
        ("parity", lambda: parity_check(device)),
        ("bf16", lambda: bf16_check(device, config=config, n_cells=min(n, 256))),
        ("sdpa", lambda: sdpa_check(device)),
        ("host_sync", lambda: host_sync_check(device, n_cells=min(n, 256))),
        ("throughput", lambda: throughput(device, config=config, n_cells=n)),
        ("ddp_smoke", lambda: ddp_smoke(device, steps=3 if small else 10)),
    ]
    for name, fn in checks:
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as err:
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        results[name]["wall_s"] = time.perf_counter() - start
        print(f"[gpu_check] {name}: {results[name]['wall_s']:.1f} s", flush=True)
    return results


def to_markdown(r: dict[str, Any]) -> str:
    """The results as a short Markdown report."""
    lines = [
        "# GPU check",
        "",
        f"Device **{r['device']}** ({r['gpu']}), torch {r['torch']}, CUDA {r['cuda']}, "
        f"mode {r['mode']}, started {r['started']}.",
        "",
    ]
    p = r.get("parity", {})
    if "error" in p:
        lines.append(f"- parity: **error** {p['error']}")
    else:
        lines.append(
            f"- parity (fp32, {p['n_cells']} cells): max |device - CPU| = "
            f"{p['max_abs_device_vs_cpu']:.2e} (tolerance {p['tolerance']:.0e}) — "
            f"**{'pass' if p['passed'] else 'FAIL'}**; vs official outputs "
            f"{p['max_abs_device_vs_official']:.2e}"
        )
    b = r.get("bf16", {})
    if "error" not in b:
        lines.append(
            f"- bf16 autocast ({b['config']}, {b['n_cells']} cells, active: "
            f"{b['autocast_active']}): max abs {b['max_abs']:.3e}, relative L2 "
            f"{b['relative_l2']:.3e}, min cosine {b['min_cosine']:.5f}"
        )
    s = r.get("sdpa", {})
    if "error" not in s:
        backends = ", ".join(f"{k[8:]}: {v}" for k, v in s.items() if k.startswith("backend_"))
        lines.append(
            f"- SDPA calls per encode: {s['sdpa_calls_per_encode']} for "
            f"{s['encoder_layers']} layers"
            + (f"; backends with the padding mask: {backends}" if backends else "")
        )
    h = r.get("host_sync", {})
    if "error" not in h:
        lines.append(
            f"- host syncs in get_latent_representation: {h.get('sync_warnings', 'n/a')} over "
            f"{h['n_batches']} batches" + (f" ({h['note']})" if "note" in h else "")
        )
    t = r.get("throughput", {})
    if "rows" in t:
        lines += [
            "",
            f"Throughput, `{t['config']}` ({t['encoder_parameters'] / 1e6:.0f}M encoder "
            f"parameters), token budget {t['max_tokens_budget']:,}:",
            "",
            "| depth (thinning rate) | cells | mean tokens | cells/s | GFLOP/cell | TFLOP/s | peak GPU MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in t["rows"]:
            lines.append(
                f"| {row['rate']} | {row['n_cells']} | {row['mean_tokens']:.0f} | "
                f"{row['cells_per_s']:.1f} | {row['encoder_gflop_per_cell']:.2f} | "
                f"{row['achieved_tflop_s']:.2f} | {row.get('peak_gpu_mib', float('nan')):.0f} |"
            )
    d = r.get("ddp_smoke", {})
    lines.append("")
    if "error" in d:
        lines.append(f"- DDP smoke: **error** {d['error']}")
    else:
        lines.append(
            f"- DDP smoke (tiny, strategy=ddp, 1 device, {d['steps']} steps): "
            f"{d['tensors_changed']}/{d['n_tensors']} tensors updated in {d['seconds']:.1f} s — "
            f"**{'pass' if d['passed'] else 'FAIL'}**"
        )
    lines.append("")
    lines.append(
        "Wall time per check: "
        + ", ".join(
            f"{k} {v['wall_s']:.0f} s"
            for k, v in r.items()
            if isinstance(v, dict) and "wall_s" in v
        )
        + "."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1 or cpu (small smoke run)")
    parser.add_argument("--quick", action="store_true", help="fewer cells")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    _require_cuda(args.device)
    small = args.device == "cpu"
    results = run_all(args.device, quick=args.quick, small=small)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out_dir / "gpu_check.md").write_text(to_markdown(results))
    print(to_markdown(results))
    failed = [
        k
        for k, v in results.items()
        if isinstance(v, dict) and ("error" in v or v.get("passed") is False)
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
