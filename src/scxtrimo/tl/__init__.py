"""Tools: scanpy-style functions that read an AnnData and write their results into it."""

from ._adapt import adapt
from ._annotate import annotate
from ._embed import embed
from ._embed_store import embed_to_store
from ._enhance import enhance
from ._gene_embeddings import context_gene_embeddings, gene_embeddings
from ._gene_modules import cluster_genes, gene_modules
from ._perturbation import predict_perturbation
from ._transfer import transfer_labels

__all__ = [
    "adapt",
    "annotate",
    "cluster_genes",
    "context_gene_embeddings",
    "embed",
    "embed_to_store",
    "enhance",
    "gene_embeddings",
    "gene_modules",
    "predict_perturbation",
    "transfer_labels",
]
