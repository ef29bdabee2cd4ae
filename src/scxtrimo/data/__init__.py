"""Data handling: the gene vocabulary, input checks, sparse kernels and batching.

Nothing in this namespace imports Lightning or scvi-tools.
"""

from ._loading import InferenceBatch, iter_inference_batches, plan_batches
from ._matrix import get_matrix, iter_row_chunks
from ._soma import SomaSource
from ._sources import (
    AnnDataFileSource,
    AnnDataSource,
    ConcatSource,
    H5adSource,
    RowSource,
    ZarrSource,
    open_source,
)
from ._tokens import InputSpec, MaskingSpec, TargetDepth, TokenIndex, pretraining_batch
from ._validation import CellStats, invalid_cells, scan_cells
from ._vocabulary import (
    DuplicateGenesWarning,
    GeneMapping,
    GeneVocabulary,
    LowVocabularyCoverageWarning,
    load_vocabulary,
    looks_like_ensembl,
    map_genes,
)

__all__ = [
    "AnnDataFileSource",
    "AnnDataSource",
    "CellStats",
    "ConcatSource",
    "DuplicateGenesWarning",
    "GeneMapping",
    "GeneVocabulary",
    "H5adSource",
    "InferenceBatch",
    "InputSpec",
    "LowVocabularyCoverageWarning",
    "MaskingSpec",
    "RowSource",
    "SomaSource",
    "TargetDepth",
    "TokenIndex",
    "ZarrSource",
    "get_matrix",
    "invalid_cells",
    "iter_inference_batches",
    "iter_row_chunks",
    "load_vocabulary",
    "looks_like_ensembl",
    "map_genes",
    "open_source",
    "plan_batches",
    "pretraining_batch",
    "scan_cells",
]
