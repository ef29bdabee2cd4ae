"""Evaluation: kNN label accuracy, neighbour votes, classification scores, batch mixing, PCA.

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
from ._mixing import batch_mixing, well_mixed_batch_mixing
from ._vote import knn_vote

__all__ = [
    "batch_mixing",
    "classification_scores",
    "knn_accuracy",
    "knn_vote",
    "log_normalized",
    "pca_baseline",
    "pca_fit_transform",
    "well_mixed_batch_mixing",
]
