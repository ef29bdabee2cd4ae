"""Shared helpers of the evaluation scripts (annotation, enhancement, gene modules).

Every script compares scxtrimo with simple baselines computed on the same cells and split, and
writes ``<name>.json`` and ``<name>.md`` to ``--out``. The baselines and scores themselves
(PCA, log-normalisation, classification scores) are package code users need too: they live in
:mod:`scxtrimo.metrics`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The timing and machine helpers are the speed suite's (benchmarks/speed/_common.py).
sys.path.insert(0, str(ROOT / "benchmarks" / "speed"))

from _common import binomial_thin, json_default, load_average, log  # noqa: E402

__all__ = [
    "KANG",
    "SHARED_DATA",
    "binomial_thin",
    "command_line",
    "load_model",
    "log",
    "machine",
    "quiet",
    "run_record",
    "write_results",
]

#: The shared data sets: ``$SCXTRIMO_SHARED_DATA``, else ``../shared/data`` beside the repository
#: (as in tests/conftest.py).
SHARED_DATA = Path(os.environ.get("SCXTRIMO_SHARED_DATA", ROOT.parent / "shared" / "data"))
KANG = SHARED_DATA / "kang2018_pbmc_12k_1287genes.h5ad"


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
        "load_average_1_5_15": load_average(),
    }


def quiet() -> None:
    """No progress bars and errors only: the scripts' own log lines are the progress report."""
    import scxtrimo

    scxtrimo.settings.progress_bar = False
    scxtrimo.settings.verbosity = "error"


def load_model(path: Path | None):
    """The pretrained model to evaluate, and a description of where it came from.

    ``path``: a saved model directory (e.g. the ``--save-model`` of
    ``benchmarks/evaluation/pretrain_pbmc4k.py``); ``None``: the model shipped with scxtrimo
    (the output of that same command, in float16). The results say which.
    """
    from scxtrimo.model import XTrimoGene, resolve_model

    if path is not None and not (Path(path) / "model.json").exists():
        raise FileNotFoundError(
            f"--model {path}: no saved model there (no model.json); pass a directory written "
            "by XTrimoGene.save or pretrain_pbmc4k.py --save-model, or leave --model out to "
            "evaluate the shipped model."
        )
    model = resolve_model(None) if path is None else XTrimoGene.load(path)
    return model, {
        "path": "shipped default (scxtrimo/_resources/pretrained)" if path is None else str(path),
        "config": _config_name(model),
        "training_args": model.training_args_,
    }


def _config_name(model) -> str:
    from scxtrimo.module import CONFIGS

    for name, cfg in CONFIGS.items():
        if cfg == model.config:
            return name
    return "custom"


def command_line(script: str, model: Path | None, options: str) -> str:
    """The command that reproduces a run (``--model`` only when one was given)."""
    return (
        f"python benchmarks/evaluation/{script}" + (f" --model {model}" if model else "") + options
    )


def run_record(command: str, model_info: dict, **fields: Any) -> dict[str, Any]:
    """A run's JSON record: its command, model and machine, then its own ``fields``."""
    return {"command": command, "model": model_info, "machine": machine(), **fields}


def write_results(out: Path, name: str, result: dict, lines: list[str]) -> None:
    """Write ``name.json`` and ``name.md`` and print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=json_default))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
