"""Tools: scanpy-style functions that write their results into AnnData."""

from ._annotate import annotate, predict_proba
from ._embed import embed, resolve_model
from ._embed_store import embed_to_store
from ._enhance import enhance
from ._evaluate import knn_accuracy, pca_baseline
from ._genes import cluster_genes, context_gene_embeddings, gene_embeddings, gene_modules
from ._perturbation import predict_perturbation
from ._store import iter_embedding_store
from ._transfer import knn_vote, transfer_labels

__all__ = [
    "annotate",
    "cluster_genes",
    "context_gene_embeddings",
    "embed",
    "embed_to_store",
    "enhance",
    "gene_embeddings",
    "gene_modules",
    "iter_embedding_store",
    "knn_accuracy",
    "knn_vote",
    "pca_baseline",
    "predict_perturbation",
    "predict_proba",
    "resolve_model",
    "transfer_labels",
]
