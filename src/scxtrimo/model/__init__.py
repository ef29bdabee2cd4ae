"""User-facing models (scvi-tools API)."""

from ._inference import PreparedInput
from ._model import XTrimoGene

__all__ = ["PreparedInput", "XTrimoGene"]
