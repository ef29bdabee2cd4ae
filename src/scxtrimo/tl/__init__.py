"""Tools: scanpy-style functions that write their results into AnnData."""

from ._embed import embed, resolve_model
from ._evaluate import knn_accuracy, pca_baseline

__all__ = ["embed", "knn_accuracy", "pca_baseline", "resolve_model"]
