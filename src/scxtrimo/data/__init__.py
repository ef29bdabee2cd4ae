"""Data handling: the gene vocabulary, input checks, sparse kernels and batching.

Nothing in this namespace imports Lightning or scvi-tools.
"""

from ._loading import InferenceBatch, iter_inference_batches, plan_batches
from ._matrix import get_matrix, iter_row_chunks
from ._tokens import InputSpec, MaskingSpec, TargetDepth, TokenIndex, pretraining_batch
from ._validation import CellStats, invalid_cells, scan_cells
from ._vocabulary import (
    GeneMapping,
    GeneVocabulary,
    LowVocabularyCoverageWarning,
    load_vocabulary,
    looks_like_ensembl,
    map_genes,
)

__all__ = [
    "CellStats",
    "GeneMapping",
    "GeneVocabulary",
    "InferenceBatch",
    "InputSpec",
    "LowVocabularyCoverageWarning",
    "MaskingSpec",
    "TargetDepth",
    "TokenIndex",
    "get_matrix",
    "invalid_cells",
    "iter_inference_batches",
    "iter_row_chunks",
    "load_vocabulary",
    "looks_like_ensembl",
    "map_genes",
    "plan_batches",
    "pretraining_batch",
    "scan_cells",
]
