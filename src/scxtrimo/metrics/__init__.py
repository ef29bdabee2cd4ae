"""Evaluation: kNN label accuracy, neighbour votes, classification scores and the PCA baseline.

Functions on arrays (embeddings and labels), not on AnnData; they import no model and no
scvi-tools. The tools (:mod:`scxtrimo.tl`) use :func:`knn_vote` for label transfer.
"""

from ._evaluate import (
    classification_scores,
    knn_accuracy,
    log_normalized,
    pca_baseline,
    pca_fit_transform,
)
from ._vote import knn_vote

__all__ = [
    "classification_scores",
    "knn_accuracy",
    "knn_vote",
    "log_normalized",
    "pca_baseline",
    "pca_fit_transform",
]
