"""PyTorch modules of the xTrimoGene / scFoundation model (scvi-tools module layer).

The configurations, the network and its three building blocks (embedding, encoder, decoder);
the attention layers and kernels stay in their rooms (``module/_encoder``, ``module/_performer``).
"""

from ._cell_head import CellHead
from ._configs import CONFIGS, XTrimoGeneConfig, get_config
from ._embedding import AutoDiscretizationEmbedding
from ._encoder import TransformerEncoder
from ._module import XTrimoGeneModule
from ._performer import PerformerDecoder

__all__ = [
    "CONFIGS",
    "AutoDiscretizationEmbedding",
    "CellHead",
    "PerformerDecoder",
    "TransformerEncoder",
    "XTrimoGeneConfig",
    "XTrimoGeneModule",
    "get_config",
]
