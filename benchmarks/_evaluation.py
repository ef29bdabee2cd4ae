"""Shared helpers of the evaluation scripts (annotation, enhancement, gene modules).

Every script compares scxtrimo with simple baselines computed on the same cells and split, and
writes ``<name>.json`` and ``<name>.md`` to ``--out``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

SHARED_DATA = Path(os.environ.get("SCXTRIMO_SHARED_DATA", "/work/shared/data"))
KANG = SHARED_DATA / "kang2018_pbmc_12k_1287genes.h5ad"
DEFAULT_MODEL = Path("/tmp/small_pbmc")


def log(message: str) -> None:
    """Progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """Threads, library versions and the load of the (shared) machine."""
    import torch

    import scxtrimo

    return {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "scxtrimo": scxtrimo.__version__,
        "platform": platform.platform(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def load_model(path: Path | None):
    """The pretrained model to evaluate, and a description of where it came from.

    ``path`` (default ``/tmp/small_pbmc``, written by ``benchmarks/pretrain_pbmc4k.py``) is
    loaded when it exists; otherwise the model shipped with scxtrimo (the output of that same
    command, in float16), and the results say which.
    """
    from scxtrimo.model import XTrimoGene
    from scxtrimo.tl import resolve_model

    path = DEFAULT_MODEL if path is None else Path(path)
    found = (path / "model.json").exists()
    if not found:
        log(f"{path} not found: evaluating the model shipped with scxtrimo")
    model = XTrimoGene.load(path) if found else resolve_model(None)
    return model, {
        "path": str(path) if found else "shipped default (scxtrimo/_resources/pretrained)",
        "config": _config_name(model),
        "training_args": model.training_args_,
    }


def _config_name(model) -> str:
    from scxtrimo.module import CONFIGS

    for name, cfg in CONFIGS.items():
        if cfg == model.config:
            return name
    return "custom"


def pretraining_split(n_obs: int, training_args: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out cells of a model pretrained on all pbmc4k cells by scxtrimo.

    Reproduces :class:`~scxtrimo.train.PretrainingDataModule`'s split (seeded permutation of
    the valid cells, ``train_size`` for training); every pbmc4k cell is valid.
    """
    args = training_args or {}
    seed, train_size = int(args.get("seed", 0)), float(args.get("train_size", 0.9))
    perm = np.random.default_rng(seed).permutation(np.arange(n_obs, dtype=np.int64))
    n_train = n_obs if train_size >= 1.0 else max(1, round(train_size * n_obs))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def log_normalize(counts) -> np.ndarray:
    """Dense ``log1p(x / total * 1e4)`` of a counts matrix (float32)."""
    x = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    x = x.astype(np.float64)
    totals = np.maximum(x.sum(axis=1, keepdims=True), 1.0)
    return np.log1p(x / totals * 1e4).astype(np.float32)


def pca_fit_transform(
    train_counts, test_counts, *, n_comps: int = 50, n_top_genes: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """The scanpy recipe fitted on the training cells only, then applied to the test cells.

    ``log1p(x / total * 1e4)`` → the ``n_top_genes`` genes most variable in the training
    cells (dispersion of the log values) → z-scores with the training mean and sd (clipped at
    10) → PCA fitted on the training cells.
    """
    from sklearn.decomposition import PCA

    train, test = log_normalize(train_counts), log_normalize(test_counts)
    variance = train.var(axis=0)
    genes = np.argsort(-variance)[: min(n_top_genes, train.shape[1])]
    genes = genes[variance[genes] > 0]
    mean, sd = train[:, genes].mean(axis=0), train[:, genes].std(axis=0) + 1e-8
    scale = lambda x: np.clip((x[:, genes] - mean) / sd, -10, 10)  # noqa: E731
    pca = PCA(n_components=min(n_comps, len(genes) - 1), random_state=0)
    return pca.fit_transform(scale(train)), pca.transform(scale(test))


def classification_scores(true, pred) -> dict[str, float]:
    """Accuracy and macro-F1 over the true classes."""
    from sklearn.metrics import f1_score

    true, pred = np.asarray(true).astype(str), np.asarray(pred).astype(str)
    labels = sorted(set(true))
    return {
        "accuracy": float((true == pred).mean()),
        "macro_f1": float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
    }


def write_results(out: Path, name: str, result: dict, lines: list[str]) -> None:
    """Write ``name.json`` and ``name.md`` and print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=_json_default))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
