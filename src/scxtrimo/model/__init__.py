"""User-facing models (scvi-tools API)."""

from scxtrimo.inference import PreparedInput  # noqa: F401  (moved; importable here as before)

from ._model import XTrimoGene
from ._pretrained import resolve_model

# PreparedInput lives in scxtrimo.inference; importable from here as before.
__all__ = ["XTrimoGene", "resolve_model"]
