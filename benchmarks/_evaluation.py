"""Shared helpers of the evaluation scripts (annotation, enhancement, gene modules).

Every script compares scxtrimo with simple baselines computed on the same cells and split, and
writes ``<name>.json`` and ``<name>.md`` to ``--out``. The baselines and scores themselves
(PCA, log-normalisation, classification scores) are package code users need too: they live in
:mod:`scxtrimo.tl._evaluate`.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from _common import json_default, load_average, log

__all__ = [
    "KANG",
    "SHARED_DATA",
    "command_line",
    "load_model",
    "log",
    "machine",
    "quiet",
    "run_record",
    "write_results",
]

SHARED_DATA = Path(os.environ.get("SCXTRIMO_SHARED_DATA", "/work/shared/data"))
KANG = SHARED_DATA / "kang2018_pbmc_12k_1287genes.h5ad"
DEFAULT_MODEL = Path("/tmp/small_pbmc")


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


def command_line(script: str, model: Path | None, options: str) -> str:
    """The command that reproduces a run (``--model`` only when one was given)."""
    return f"python benchmarks/{script}" + (f" --model {model}" if model else "") + options


def run_record(command: str, model_info: dict, **fields: Any) -> dict[str, Any]:
    """A run's JSON record: its command, model and machine, then its own ``fields``."""
    return {"command": command, "model": model_info, "machine": machine(), **fields}


def write_results(out: Path, name: str, result: dict, lines: list[str]) -> None:
    """Write ``name.json`` and ``name.md`` and print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=json_default))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
