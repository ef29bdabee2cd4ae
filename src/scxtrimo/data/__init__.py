"""Data handling: row sources, the gene vocabulary, input checks and the token specifications.

What a user composes; the kernels, token layouts and batch builders stay in their rooms
(``data/_kernels*``, ``data/_tokens``, ``data/_loading``). Nothing in this namespace imports
Lightning or scvi-tools.
"""

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
from ._tokens import InputSpec, MaskingSpec, TargetDepth, TokenIndex
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
    "iter_row_chunks",
    "load_vocabulary",
    "looks_like_ensembl",
    "map_genes",
    "open_source",
    "scan_cells",
]
