"""The inference engine: checked input, the encoder and decoder passes, and out-of-core embedding.

Everything here works on a module (:class:`~scxtrimo.module.XTrimoGeneModule`, a model's
``model.module``) and checked input (:class:`PreparedInput`); the methods of
:class:`~scxtrimo.model.XTrimoGene` are thin wrappers over it, the way scvi-tools' ``SCVI``
wraps its ``VAE``, and the tools and fine-tuning call it with ``model.module``.

The engine itself imports neither scvi-tools nor Lightning (the module it is handed is a
scvi-tools ``BaseModuleClass``, so using it loads scvi-tools anyway); the multi-process pieces
(:class:`ChunkPredictor`, :class:`ChunkDataModule`, :class:`StoreWriter`,
:func:`predict_chunks`) import Lightning and are loaded when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._chunks import DEFAULT_CHUNK_SIZE, ChunkEngine
from ._decode import DecoderOutput, gene_embedding_table, iter_decoder, vocabulary_positions
from ._encode import embed_prepared, encode_pooled
from ._input import InputSettings
from ._io import atomic_write
from ._precision import Int8DynamicLinear, Precision, check_precision, quantized_copy
from ._prepare import (
    InvalidCells,
    Pooling,
    PreparedInput,
    check_max_genes,
    check_setup_arguments,
    prepare_input,
    resolve_device,
    resolve_max_genes,
)
from ._store import (
    EmbeddingStore,
    input_fingerprint,
    iter_embedding_store,
    leaf_sources,
    model_fingerprint,
)

if TYPE_CHECKING:  # pragma: no cover
    from ._distributed import ChunkDataModule, ChunkPredictor, StoreWriter, predict_chunks

_LIGHTNING = ("ChunkDataModule", "ChunkPredictor", "StoreWriter", "predict_chunks")

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ChunkDataModule",
    "ChunkEngine",
    "ChunkPredictor",
    "DecoderOutput",
    "EmbeddingStore",
    "InputSettings",
    "Int8DynamicLinear",
    "InvalidCells",
    "Pooling",
    "Precision",
    "PreparedInput",
    "StoreWriter",
    "atomic_write",
    "check_max_genes",
    "check_precision",
    "check_setup_arguments",
    "embed_prepared",
    "encode_pooled",
    "gene_embedding_table",
    "input_fingerprint",
    "iter_decoder",
    "iter_embedding_store",
    "leaf_sources",
    "model_fingerprint",
    "predict_chunks",
    "prepare_input",
    "quantized_copy",
    "resolve_device",
    "resolve_max_genes",
    "vocabulary_positions",
]


def __getattr__(name: str):
    if name in _LIGHTNING:
        return getattr(importlib.import_module(f"{__name__}._distributed"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
