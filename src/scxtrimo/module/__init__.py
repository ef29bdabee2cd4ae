"""PyTorch modules of the xTrimoGene / scFoundation model (scvi-tools module layer)."""

from ._configs import CONFIGS, XTrimoGeneConfig, get_config
from ._embedding import AutoDiscretizationEmbedding
from ._encoder import MultiHeadSelfAttention, TransformerEncoder, TransformerEncoderLayer
from ._module import XTrimoGeneModule
from ._performer import (
    PerformerDecoder,
    PerformerLayer,
    PerformerSelfAttention,
    favor_softmax_features,
    gaussian_orthogonal_random_matrix,
    linear_attention,
)

__all__ = [
    "CONFIGS",
    "AutoDiscretizationEmbedding",
    "MultiHeadSelfAttention",
    "PerformerDecoder",
    "PerformerLayer",
    "PerformerSelfAttention",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "XTrimoGeneConfig",
    "XTrimoGeneModule",
    "favor_softmax_features",
    "gaussian_orthogonal_random_matrix",
    "get_config",
    "linear_attention",
]
