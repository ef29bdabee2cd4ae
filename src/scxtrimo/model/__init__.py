"""User-facing models (scvi-tools API)."""

from ._model import PreparedInput, XTrimoGene

__all__ = ["PreparedInput", "XTrimoGene"]
