"""Reading official scFoundation (xTrimoGene) checkpoints into :class:`XTrimoGeneModule` form."""

from __future__ import annotations

import copy
import logging
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch

from scxtrimo.module._configs import XTrimoGeneConfig

__all__ = [
    "LICENSE_NOTICE",
    "map_scfoundation_key",
    "read_scfoundation_checkpoint",
    "scfoundation_state_dict_keys",
]

logger = logging.getLogger(__name__)

LICENSE_NOTICE = (
    "The pretrained scFoundation (xTrimoGene) weights are released by BioMap Research "
    "(https://github.com/biomap-research/scFoundation) under the scFoundation Model License: "
    "non-commercial research use only (see MODEL_LICENSE in that repository). scxtrimo does not "
    "distribute the weights; obtain `models.ckpt` from the links in that repository's model/ "
    "README and make sure your use complies with the licence. The scxtrimo code itself is "
    "BSD-3-Clause and the official code Apache-2.0."
)

#: Prefix of every model tensor in the Lightning-style official state dict.
_STATE_DICT_PREFIX = "model."
#: Magic values of the official model; scxtrimo uses explicit boolean flags instead, so a file
#: with other values would encode a model we do not reproduce.
_OFFICIAL_PAD_TOKEN_ID = 103
_OFFICIAL_MASK_TOKEN_ID = 102
#: Official expansion factor of both feed-forward blocks (``dim_feedforward = 4 * dim``).
_FF_MULT = 4
#: Dropout of the official encoder layers (torch default; inactive at inference).
_OFFICIAL_ENCODER_DROPOUT = 0.1

# Official name (without the "model." prefix) -> our module's name. Full matches, first wins.
_KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"token_emb\.mlp\.(weight|bias)", r"value_embedding.value_to_bin_logits.\1"),
        (r"token_emb\.mlp2\.(weight|bias)", r"value_embedding.bin_logit_mixing.\1"),
        (r"token_emb\.emb\.weight", "value_embedding.bin_embeddings.weight"),
        (r"token_emb\.emb_mask\.weight", "value_embedding.mask_embedding"),
        (r"token_emb\.emb_pad\.weight", "value_embedding.padding_embedding"),
        (r"pos_emb\.weight", "gene_embedding.weight"),
        (
            r"encoder\.transformer_encoder\.(\d+)\.self_attn\.in_proj_(weight|bias)",
            r"encoder.layers.\1.attention.qkv_proj.\2",
        ),
        (
            r"encoder\.transformer_encoder\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
            r"encoder.layers.\1.attention.out_proj.\2",
        ),
        (
            r"encoder\.transformer_encoder\.(\d+)\.linear1\.(weight|bias)",
            r"encoder.layers.\1.ff_in.\2",
        ),
        (
            r"encoder\.transformer_encoder\.(\d+)\.linear2\.(weight|bias)",
            r"encoder.layers.\1.ff_out.\2",
        ),
        (
            r"encoder\.transformer_encoder\.(\d+)\.norm1\.(weight|bias)",
            r"encoder.layers.\1.attention_norm.\2",
        ),
        (
            r"encoder\.transformer_encoder\.(\d+)\.norm2\.(weight|bias)",
            r"encoder.layers.\1.ff_norm.\2",
        ),
        (r"encoder\.norm\.(weight|bias)", r"encoder.final_norm.\1"),
        (r"decoder_embed\.(weight|bias)", r"decoder_embed.\1"),
        (r"decoder\.performer\.calls_since_last_redraw", "decoder.calls_since_last_redraw"),
        (
            r"decoder\.performer\.net\.layers\.(\d+)\.0\.norm\.(weight|bias)",
            r"decoder.layers.\1.attention_norm.\2",
        ),
        (
            r"decoder\.performer\.net\.layers\.(\d+)\.0\.fn\.fast_attention\.projection_matrix",
            r"decoder.layers.\1.attention.projection_matrix",
        ),
        (
            r"decoder\.performer\.net\.layers\.(\d+)\.0\.fn\.to_(q|k|v|out)\.(weight|bias)",
            r"decoder.layers.\1.attention.\2_proj.\3",
        ),
        (
            r"decoder\.performer\.net\.layers\.(\d+)\.1\.norm\.(weight|bias)",
            r"decoder.layers.\1.ff_norm.\2",
        ),
        (
            r"decoder\.performer\.net\.layers\.(\d+)\.1\.fn\.fn\.w1\.(weight|bias)",
            r"decoder.layers.\1.ff_in.\2",
        ),
        (
            r"decoder\.performer\.net\.layers\.(\d+)\.1\.fn\.fn\.w2\.(weight|bias)",
            r"decoder.layers.\1.ff_out.\2",
        ),
        (r"decoder\.norm\.(weight|bias)", r"decoder.final_norm.\1"),
        (r"norm\.(weight|bias)", r"head_norm.\1"),
        (r"to_final\.(weight|bias)", r"expression_head.\1"),
    )
)


def map_scfoundation_key(key: str) -> str | None:
    """Name in :class:`~scxtrimo.module.XTrimoGeneModule` of an official state-dict key.

    Parameters
    ----------
    key
        Official key, with or without the Lightning ``"model."`` prefix.

    Returns
    -------
    Our key, or ``None`` if ``key`` is not a tensor of the official model.
    """
    key = key.removeprefix(_STATE_DICT_PREFIX)
    for pattern, replacement in _KEY_RULES:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    return None


def scfoundation_state_dict_keys(config: XTrimoGeneConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official state dict for a configuration.

    The layout is written out from the official model definition (not derived from our module),
    so comparing it with :class:`~scxtrimo.module.XTrimoGeneModule`'s state dict under
    :func:`map_scfoundation_key` checks the module against the released checkpoints.

    Parameters
    ----------
    config
        Model configuration.

    Returns
    -------
    Official key (without the ``"model."`` prefix) → shape, in the order of the official module.
    """
    d, dd, bins = config.encoder_dim, config.decoder_dim, config.bin_num
    inner, ff_enc, ff_dec = config.decoder_inner_dim, config.encoder_ff_dim, config.decoder_ff_dim
    keys: dict[str, tuple[int, ...]] = {
        "token_emb.mlp.weight": (bins, 1),
        "token_emb.mlp.bias": (bins,),
        "token_emb.mlp2.weight": (bins, bins),
        "token_emb.mlp2.bias": (bins,),
        "token_emb.emb.weight": (bins, d),
        "token_emb.emb_mask.weight": (1, d),
        "token_emb.emb_pad.weight": (1, d),
        "pos_emb.weight": (config.n_gene_embeddings, d),
    }
    for i in range(config.encoder_depth):
        prefix = f"encoder.transformer_encoder.{i}."
        keys |= {
            prefix + "self_attn.in_proj_weight": (3 * d, d),
            prefix + "self_attn.in_proj_bias": (3 * d,),
            prefix + "self_attn.out_proj.weight": (d, d),
            prefix + "self_attn.out_proj.bias": (d,),
            prefix + "linear1.weight": (ff_enc, d),
            prefix + "linear1.bias": (ff_enc,),
            prefix + "linear2.weight": (d, ff_enc),
            prefix + "linear2.bias": (d,),
            prefix + "norm1.weight": (d,),
            prefix + "norm1.bias": (d,),
            prefix + "norm2.weight": (d,),
            prefix + "norm2.bias": (d,),
        }
    keys |= {
        "encoder.norm.weight": (d,),
        "encoder.norm.bias": (d,),
        "decoder_embed.weight": (dd, d),
        "decoder_embed.bias": (dd,),
        "decoder.performer.calls_since_last_redraw": (),
    }
    for i in range(config.decoder_depth):
        prefix = f"decoder.performer.net.layers.{i}."
        keys |= {
            prefix + "0.norm.weight": (dd,),
            prefix + "0.norm.bias": (dd,),
            prefix + "0.fn.fast_attention.projection_matrix": (
                config.nb_features,
                config.decoder_dim_head,
            ),
        }
        for name in ("to_q", "to_k", "to_v"):
            keys |= {
                prefix + f"0.fn.{name}.weight": (inner, dd),
                prefix + f"0.fn.{name}.bias": (inner,),
            }
        keys |= {
            prefix + "0.fn.to_out.weight": (dd, inner),
            prefix + "0.fn.to_out.bias": (dd,),
            prefix + "1.norm.weight": (dd,),
            prefix + "1.norm.bias": (dd,),
            prefix + "1.fn.fn.w1.weight": (ff_dec, dd),
            prefix + "1.fn.fn.w1.bias": (ff_dec,),
            prefix + "1.fn.fn.w2.weight": (dd, ff_dec),
            prefix + "1.fn.fn.w2.bias": (dd,),
        }
    keys |= {
        "decoder.norm.weight": (dd,),
        "decoder.norm.bias": (dd,),
        "norm.weight": (dd,),
        "norm.bias": (dd,),
        "to_final.weight": (1, dd),
        "to_final.bias": (1,),
    }
    return keys


# -- file reading ---------------------------------------------------------------------------------
def _load_torch_file(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and clear errors for unreadable files."""
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
    if not path.is_file():
        raise ValueError(f"Checkpoint path {str(path)!r} is not a regular file.")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"Checkpoint file {str(path)!r} is empty (0 bytes).")
    with path.open("rb") as handle:
        head = handle.read(4)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        if head.startswith(b"PK"):
            raise ValueError(
                f"Checkpoint file {str(path)!r} ({size:,} bytes) starts like a zip-format torch "
                "checkpoint but its zip directory is missing: the file is truncated or corrupted "
                "(e.g. an interrupted download). Download it again."
            )
        if head[:1] != b"\x80":
            raise ValueError(
                f"{str(path)!r} is not a PyTorch checkpoint: it is neither a zip-format torch file "
                f"nor a legacy pickle-based one (first bytes {head!r})."
            )
    try:
        # mmap: only the tensors of the requested sub-model are ever read from disk. The legacy
        # (non-zip) format cannot be memory-mapped.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        # Keep only torch's one-line diagnosis (e.g. "Unsupported global: GLOBAL io.open ..."),
        # not its advice to retry with weights_only=False.
        diagnosis = re.search(r"WeightsUnpickler error: ([^\n]*)", str(error))
        detail = diagnosis.group(1) if diagnosis else str(error).splitlines()[0]
        raise ValueError(
            f"Did not load {str(path)!r}: the file contains non-tensor Python objects, which "
            "could execute arbitrary code when unpickled, so it was refused for safety (it was "
            "opened with `torch.load(weights_only=True)`; nothing in it was run). Official "
            "scFoundation checkpoints contain only dicts, lists, numbers, strings and tensors. "
            f"Details: {detail}"
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError) as error:
        raise ValueError(
            f"Could not read checkpoint file {str(path)!r} ({size:,} bytes); it is corrupted or "
            f"truncated: {type(error).__name__}: {error}"
        ) from error


def _require_mapping(parent: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    if key not in parent:
        raise ValueError(f"{where} has no {key!r} entry; found keys {sorted(map(str, parent))}.")
    value = parent[key]
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}[{key!r}] must be a dict, got {type(value).__name__}.")
    return value


def _require_int(parent: Mapping[str, Any], key: str, where: str) -> int:
    if key not in parent:
        raise ValueError(f"{where} is missing the required entry {key!r}.")
    value = parent[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}[{key!r}] must be an integer, got {value!r}.")
    return value


def _config_from_official(model_config: Mapping[str, Any], where: str) -> XTrimoGeneConfig:
    """Translate the official ``model_config['mae_autobin']`` dictionary."""
    seq_len = _require_int(model_config, "seq_len", where)
    # n_genes derives from seq_len (genes + T + S); the gene-embedding shape check then ensures
    # the tensors agree. A vocabulary other than 19,264 genes is caught by the data layer.
    if "gene_num" in model_config and model_config["gene_num"] != seq_len:
        raise ValueError(
            f"{where}['gene_num'] = {model_config['gene_num']!r} differs from seq_len = {seq_len}."
        )
    expected_ids = {
        "pad_token_id": _OFFICIAL_PAD_TOKEN_ID,
        "mask_token_id": _OFFICIAL_MASK_TOKEN_ID,
    }
    for key, expected in expected_ids.items():
        if model_config.get(key) != expected:
            raise ValueError(
                f"{where}[{key!r}] is {model_config.get(key)!r}; scxtrimo supports the released "
                f"value {expected} only."
            )
    for flag in ("mask_gene_name", "pos_embed"):
        if model_config.get(flag):
            raise ValueError(f"{where}[{flag!r}] = True is not supported (the release uses False).")
    encoder = _require_mapping(model_config, "encoder", where)
    decoder = _require_mapping(model_config, "decoder", where)
    for name, part, module_type in (
        ("encoder", encoder, "transformer"),
        ("decoder", decoder, "performer"),
    ):
        if part.get("module_type") != module_type:
            raise ValueError(
                f"{where}[{name!r}]['module_type'] is {part.get('module_type')!r}; only "
                f"{module_type!r} (the released architecture) is supported."
            )
        if "seq_len" in part and part["seq_len"] != seq_len:
            raise ValueError(
                f"{where}[{name!r}]['seq_len'] = {part['seq_len']!r} differs from seq_len = "
                f"{seq_len}."
            )
    bin_alpha = model_config.get("bin_alpha", 1.0)
    if isinstance(bin_alpha, bool) or not isinstance(bin_alpha, int | float):
        raise ValueError(f"{where}['bin_alpha'] must be a number, got {bin_alpha!r}.")
    encoder_dim = _require_int(encoder, "hidden_dim", f"{where}['encoder']")
    decoder_dim = _require_int(decoder, "hidden_dim", f"{where}['decoder']")
    decoder_dim_head = _require_int(decoder, "dim_head", f"{where}['decoder']")
    if decoder_dim_head < 2:
        raise ValueError(
            f"{where}['decoder']['dim_head'] must be at least 2, got {decoder_dim_head}."
        )
    try:
        return XTrimoGeneConfig(
            n_genes=seq_len - 2,
            bin_num=_require_int(model_config, "bin_num", where),
            bin_alpha=float(bin_alpha),
            encoder_dim=encoder_dim,
            encoder_depth=_require_int(encoder, "depth", f"{where}['encoder']"),
            encoder_heads=_require_int(encoder, "heads", f"{where}['encoder']"),
            encoder_ff_dim=_FF_MULT * encoder_dim,
            encoder_norm_first=bool(encoder.get("norm_first", False)),
            encoder_activation="relu",
            encoder_dropout=_OFFICIAL_ENCODER_DROPOUT,
            encoder_attention_dropout=_OFFICIAL_ENCODER_DROPOUT,  # torch layers drop attention weights too
            decoder_dim=decoder_dim,
            decoder_depth=_require_int(decoder, "depth", f"{where}['decoder']"),
            decoder_heads=_require_int(decoder, "heads", f"{where}['decoder']"),
            decoder_dim_head=decoder_dim_head,
            decoder_ff_dim=_FF_MULT * decoder_dim,
            # Explicit (official rule int(d * ln d)) so the released file's configuration equals
            # CONFIGS["scfoundation"].
            decoder_nb_features=int(decoder_dim_head * math.log(decoder_dim_head)),
        )
    except ValueError as error:
        raise ValueError(f"{where} describes an invalid model: {error}") from error


def _expected_state_dict_shapes(config: XTrimoGeneConfig) -> dict[str, tuple[torch.Size, bool]]:
    """Our module's state-dict shapes (and whether each tensor is floating), built on meta."""
    from scxtrimo.module._module import XTrimoGeneModule

    with torch.device("meta"):
        module = XTrimoGeneModule(config)
    return {
        key: (tensor.shape, tensor.is_floating_point())
        for key, tensor in module.state_dict().items()
    }


def _format_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_scfoundation_checkpoint(
    path: str | PathLike[str],
    checkpoint: Literal["cell", "rde", "gene"] = "cell",
) -> tuple[XTrimoGeneConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read one sub-model of an official scFoundation ``models.ckpt``.

    The file is opened with ``torch.load(weights_only=True)`` (memory-mapped for zip-format
    files, so only the requested sub-model's tensors are read): a file that would run code when
    unpickled is refused. Everything is validated before a tensor is returned.

    Parameters
    ----------
    path
        Path of the official checkpoint (a dict ``{"gene": ..., "cell": ..., "rde": ...}``).
    checkpoint
        Sub-model: ``"cell"`` (cell embeddings, ``--version ce``), ``"rde"`` (read-depth
        enhancement, ``--version rde``) or ``"gene"`` (decoder/gene embeddings and expression).

    Returns
    -------
    config
        The model configuration.
    state_dict
        Tensors under :class:`~scxtrimo.module.XTrimoGeneModule` names, ready for
        ``module.load_state_dict(state_dict)``.
    metadata
        ``path``, ``checkpoint``, ``available_checkpoints``, the raw ``model_config`` and
        ``dataset_config`` dictionaries (deep copies; ``None`` if absent), the ignored
        non-model entries ``extra_entries`` and the ``license_notice``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is empty, truncated, not a torch checkpoint, unsafe to unpickle, lacks the
        requested sub-model, has an unsupported configuration, or its tensors do not match the
        configuration (missing, unexpected or mis-shaped keys).
    """
    path = Path(path).expanduser()
    loaded = _load_torch_file(path)
    where = f"Checkpoint {str(path)!r}"
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"{where} holds a {type(loaded).__name__}, expected a dict of sub-models with keys "
            "'gene', 'cell' and 'rde'."
        )
    available = sorted(map(str, loaded))
    if checkpoint not in loaded:
        raise ValueError(
            f"{where} has no sub-model {checkpoint!r}; available keys: {available}. Use "
            "'cell' for cell embeddings, 'rde' for read-depth enhancement, 'gene' for gene "
            "embeddings and expression."
        )
    where = f"{where}[{checkpoint!r}]"
    sub_model = loaded[checkpoint]
    if not isinstance(sub_model, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(sub_model).__name__}.")
    raw_config = _require_mapping(sub_model, "config", where)
    raw_state_dict = _require_mapping(sub_model, "state_dict", where)
    if raw_config.get("model") != "mae_autobin":
        raise ValueError(
            f"{where}['config']['model'] is {raw_config.get('model')!r}; only the released "
            "'mae_autobin' model is supported."
        )
    model_configs = _require_mapping(raw_config, "model_config", f"{where}['config']")
    model_config = _require_mapping(
        model_configs, "mae_autobin", f"{where}['config']['model_config']"
    )
    dataset_config = None
    if "dataset_config" in raw_config:
        dataset_configs = _require_mapping(raw_config, "dataset_config", f"{where}['config']")
        dataset_config = _require_mapping(
            dataset_configs, "rnaseq", f"{where}['config']['dataset_config']"
        )
    config = _config_from_official(
        model_config, f"{where}['config']['model_config']['mae_autobin']"
    )

    expected = _expected_state_dict_shapes(config)
    state_dict: dict[str, torch.Tensor] = {}
    official_name: dict[str, str] = {}
    unexpected: list[str] = []
    for key, tensor in raw_state_dict.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"{where}['state_dict'] entry {key!r} is a {type(tensor).__name__}, expected a "
                "tensor under a string key."
            )
        ours = map_scfoundation_key(key)
        if ours is None or ours not in expected:
            unexpected.append(key)
            continue
        if ours in state_dict:
            raise ValueError(
                f"{where}['state_dict'] has both {official_name[ours]!r} and {key!r} for {ours!r}."
            )
        shape, is_float = expected[ours]
        if tensor.shape != shape:
            raise ValueError(
                f"{where}['state_dict'][{key!r}] (our {ours!r}) has shape {tuple(tensor.shape)}, "
                f"but the configuration in the file implies {tuple(shape)}."
            )
        if tensor.is_floating_point() != is_float:
            raise ValueError(
                f"{where}['state_dict'][{key!r}] has dtype {tensor.dtype}, expected a "
                f"{'floating-point' if is_float else 'integer'} tensor."
            )
        state_dict[ours] = tensor
        official_name[ours] = key
    if unexpected:
        raise ValueError(
            f"{where}['state_dict'] has {len(unexpected)} tensor(s) that are not part of the "
            f"scFoundation model: {_format_keys(sorted(unexpected))}."
        )
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(
            f"{where}['state_dict'] is missing {len(missing)} tensor(s) (our names): "
            f"{_format_keys(missing)}."
        )
    metadata = {
        "path": str(path),
        "checkpoint": checkpoint,
        "available_checkpoints": available,
        "model_config": copy.deepcopy(dict(model_config)),
        "dataset_config": None if dataset_config is None else copy.deepcopy(dict(dataset_config)),
        "extra_entries": sorted(
            str(key) for key in sub_model if key not in ("config", "state_dict")
        ),
        "license_notice": LICENSE_NOTICE,
    }
    # The licence notice is for the caller to show (see `metadata["license_notice"]`).
    logger.debug("Read scFoundation sub-model %r from %s.", checkpoint, path)
    return config, state_dict, metadata
