"""User-facing models (scvi-tools API)."""

from ._model import XTrimoGene

__all__ = ["XTrimoGene"]
