"""Plots of scxtrimo results."""

from ._annotation import confusion_matrix
from ._genes import gene_module_heatmap
from ._plots import gene_overlap, training_history

__all__ = ["confusion_matrix", "gene_module_heatmap", "gene_overlap", "training_history"]
