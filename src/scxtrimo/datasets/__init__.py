"""Real single-cell datasets shipped with scxtrimo (work offline)."""

from ._datasets import pbmc4k

__all__ = ["pbmc4k"]
