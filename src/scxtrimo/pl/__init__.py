"""Plots of scxtrimo results."""

from ._plots import gene_overlap, training_history

__all__ = ["gene_overlap", "training_history"]
