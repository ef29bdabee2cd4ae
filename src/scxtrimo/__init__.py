"""scxtrimo: the xTrimoGene / scFoundation single-cell foundation model for the scverse.

The public namespaces are imported lazily so that ``import scxtrimo`` stays light: neither
Lightning nor scvi-tools is imported until a model is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

_SUBMODULES = ("data", "datasets", "inference", "metrics", "model", "module", "pl", "tl", "train")

if TYPE_CHECKING:  # pragma: no cover
    from . import data, datasets, inference, metrics, model, module, pl, tl, train  # noqa: F401
    from ._settings import settings

__all__ = [*_SUBMODULES, "__version__", "settings"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "settings":
        from ._settings import settings

        return settings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
