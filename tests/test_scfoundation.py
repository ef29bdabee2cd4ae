"""Parity with the official scFoundation code and checkpoint-reading errors.

The fixture ``tests/data/parity_small`` holds a small random model in the exact official
checkpoint format and the outputs of the official ``get_embedding.py`` for it (see its README).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch

from scxtrimo.model._scfoundation import (
    LICENSE_NOTICE,
    map_scfoundation_key,
    read_scfoundation_checkpoint,
    scfoundation_state_dict_keys,
)
from scxtrimo.module import XTrimoGeneModule

DATA = Path(__file__).parent / "data" / "parity_small"
CHECKPOINT = DATA / "models.ckpt"
N_GENES = 19264
CELL_TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}
GENE_TOLERANCE = {"atol": 5e-5, "rtol": 1e-4}


# -- fixtures and the reference preprocessing -----------------------------------------------------
@pytest.fixture(scope="module")
def parity() -> dict[str, np.ndarray]:
    with np.load(DATA / "parity.npz") as archive:
        return dict(archive)


def dense(parity: dict[str, np.ndarray], name: str) -> np.ndarray:
    parts = (parity[f"{name}_data"], parity[f"{name}_indices"], parity[f"{name}_indptr"])
    return scipy.sparse.csr_matrix(parts, shape=tuple(parity[f"{name}_shape"])).toarray()


@pytest.fixture(scope="module")
def modules() -> dict[str, XTrimoGeneModule]:
    loaded = {}
    for key in ("cell", "rde", "gene"):
        config, state_dict, _ = read_scfoundation_checkpoint(CHECKPOINT, key)
        module = XTrimoGeneModule(config)
        module.load_state_dict(state_dict)
        loaded[key] = module.eval()
    return loaded


@pytest.fixture(scope="module")
def raw_checkpoint() -> dict:
    return torch.load(CHECKPOINT, map_location="cpu", weights_only=True)


def depth_tokens(total: np.ndarray, tgthighres: str) -> tuple[np.ndarray, np.ndarray]:
    """T and S per the official ``--tgthighres`` rule (float64)."""
    source = np.log10(total)
    amount = float(tgthighres[1:])
    if tgthighres[0] == "t":
        target = np.full_like(source, amount)
    elif tgthighres[0] == "a":
        target = source + amount
    else:
        target = np.log10(total * amount)
    return target, source


def preprocess(parity: dict[str, np.ndarray], mode: str, tgthighres: str):
    """Gene values [B, n_genes], T [B], S [B] as the official script computes them (float64)."""
    if mode == "F":
        counts = dense(parity, "aligned_counts")
        total = counts.sum(axis=1)
        np.testing.assert_array_equal(total, parity["aligned_total_counts"])
        values = np.log1p(counts / total[:, None] * 1e4)
    elif mode == "T":
        # Official quirk: the "total count" of pre-normalised input is the sum of its log values.
        values = dense(parity, "lognorm")
        total = values.sum(axis=1)
    elif mode == "A":
        values = dense(parity, "lognorm")
        total = parity["aligned_total_counts"]
    else:  # bulk, pre_normalized F: normalise to the median total of the file, then log1p
        counts = parity["bulk_input"]
        library_size = counts.sum(axis=1)
        values = np.log1p(counts / library_size[:, None] * np.median(library_size))
        level = np.log10(values.sum(axis=1))
        return values, level, level
    target, source = depth_tokens(total, tgthighres)
    return values, target, source


def encoder_batch(values: np.ndarray, target: np.ndarray, source: np.ndarray):
    """Contract layout: [T, S, non-zero genes ascending, padding], cast to float32 first."""
    full = np.concatenate([target[:, None], source[:, None], values], axis=1).astype(np.float32)
    keep = full > 0
    keep[:, :2] = True
    gene_ids = np.concatenate([[N_GENES, N_GENES + 1], np.arange(N_GENES)])
    order = np.argsort(~keep, axis=1, kind="stable")[:, : keep.sum(axis=1).max()]
    padding = ~np.take_along_axis(keep, order, axis=1)
    gene_index = np.where(padding, N_GENES + 2, gene_ids[order])
    value = np.where(padding, 0.0, np.take_along_axis(full, order, axis=1)).astype(np.float32)
    return torch.from_numpy(gene_index), torch.from_numpy(value), torch.from_numpy(padding)


# -- parity ---------------------------------------------------------------------------------------
CELL_CASES = [
    ("out_cell_ce_all_t4_F", "cell", "F", "t4", "all"),
    ("out_cell_ce_max_t4_F", "cell", "F", "t4", "max"),
    ("out_cell_rde_all_a5_F", "rde", "F", "a5", "all"),
    ("out_cell_ce_all_f1_F", "cell", "F", "f1", "all"),
    ("out_cell_ce_all_f2_F", "cell", "F", "f2", "all"),
    ("out_cell_ce_all_t4_T", "cell", "T", "t4", "all"),
    ("out_cell_ce_all_t4_A", "cell", "A", "t4", "all"),
    ("out_bulk_ce_all_F", "cell", "bulk", "f1", "all"),
]


@pytest.mark.parametrize(("array", "checkpoint", "mode", "tgthighres", "pooling"), CELL_CASES)
def test_cell_embeddings_match_official(
    parity, modules, array, checkpoint, mode, tgthighres, pooling
):
    gene_index, value, padding_mask = encoder_batch(*preprocess(parity, mode, tgthighres))
    if mode != "bulk":  # all 64 cells, of many different lengths, in one padded batch
        assert value.shape[0] == 64
        assert len(set(padding_mask.sum(1).tolist())) > 10
    module = modules[checkpoint]
    with torch.no_grad():
        h = module.encode(gene_index, value, padding_mask)
        embedding = module.pool(h, padding_mask, pooling).numpy()
    np.testing.assert_allclose(embedding, parity[array], **CELL_TOLERANCE)
    if array == "out_cell_ce_all_t4_F":
        # The test is sensitive to the sub-model: the 'rde' weights do not reproduce 'cell'.
        with torch.no_grad():
            wrong = modules["rde"].pool(
                modules["rde"].encode(gene_index, value, padding_mask), padding_mask, pooling
            )
        assert np.abs(wrong.numpy() - parity[array]).max() > 1e-2


def gene_inputs(parity: dict[str, np.ndarray], cells: np.ndarray):
    values, target, source = preprocess(parity, "F", "f1")
    return encoder_batch(values[cells], target[cells], source[cells])


def test_gene_embeddings_match_official_per_cell_and_batched(parity, modules):
    module = modules["gene"]
    gene_index, value, padding_mask = gene_inputs(parity, parity["gene_cells_idx"])
    rows = torch.from_numpy(parity["gene_eval_gene_idx"].astype(np.int64))
    with torch.no_grad():
        h = module.encode(gene_index, value, padding_mask)
        outputs = {
            mode: module.gene_embeddings(
                h, gene_index, padding_mask, key_stabilizer=mode, genes=rows
            ).numpy()
            for mode in ("cell", "batch")
        }
    per_cell, batched = parity["out_gene_f1_F"], parity["out_gene_batch_f1_F"]
    np.testing.assert_allclose(outputs["cell"], per_cell, **GENE_TOLERANCE)
    np.testing.assert_allclose(outputs["batch"], batched, **GENE_TOLERANCE)
    # Each stabiliser mode reproduces its own official mode better than the other one.
    assert np.abs(outputs["cell"] - per_cell).max() < np.abs(outputs["cell"] - batched).max()
    assert np.abs(outputs["batch"] - batched).max() < np.abs(outputs["batch"] - per_cell).max()


def test_gene_expression_matches_official(parity, modules):
    module = modules["gene"]
    gene_index, value, padding_mask = gene_inputs(parity, parity["gexp_cells_idx"])
    with torch.no_grad():
        h = module.encode(gene_index, value, padding_mask)
        expression = module.expression(h, gene_index, padding_mask)[:, :N_GENES].numpy()
    np.testing.assert_allclose(expression, parity["out_gene_expression_f1_F"], **GENE_TOLERANCE)


# -- reading --------------------------------------------------------------------------------------
def test_read_checkpoint_config_keys_and_metadata(raw_checkpoint):
    config, state_dict, metadata = read_scfoundation_checkpoint(str(CHECKPOINT), "gene")
    assert (config.encoder_dim, config.encoder_depth, config.encoder_heads) == (64, 2, 4)
    assert (config.encoder_ff_dim, config.encoder_norm_first) == (256, False)
    assert (config.decoder_dim, config.decoder_depth, config.decoder_heads) == (32, 2, 4)
    assert (config.decoder_dim_head, config.decoder_ff_dim, config.nb_features) == (8, 128, 16)
    assert (config.n_genes, config.bin_num, config.bin_alpha) == (19264, 100, 1.0)
    with torch.device("meta"):
        expected = XTrimoGeneModule(config).state_dict()
    assert set(state_dict) == set(expected)
    assert metadata["available_checkpoints"] == ["cell", "gene", "rde"]
    assert metadata["dataset_config"]["mask_prob"] == 0.3
    assert metadata["model_config"]["pad_token_id"] == 103
    assert metadata["license_notice"] == LICENSE_NOTICE
    assert "non-commercial" in LICENSE_NOTICE
    # The independent listing of the official layout matches the real file.
    official = {
        key.removeprefix("model."): tuple(tensor.shape)
        for key, tensor in raw_checkpoint["gene"]["state_dict"].items()
    }
    assert scfoundation_state_dict_keys(config) == official
    raw = raw_checkpoint["gene"]["state_dict"]
    for key, tensor in raw.items():
        assert torch.equal(state_dict[map_scfoundation_key(key)], tensor)
    _, cell_state, _ = read_scfoundation_checkpoint(CHECKPOINT, "cell")
    assert not torch.equal(cell_state["gene_embedding.weight"], state_dict["gene_embedding.weight"])


def test_released_config_translates_to_named_config():
    from scxtrimo.model._scfoundation import _config_from_official
    from scxtrimo.module import CONFIGS

    released = {  # the released model's config (spec section 1.1)
        "model": "mae_autobin",
        "seq_len": 19266,
        "gene_num": 19266,
        "encoder": {"hidden_dim": 768, "depth": 12, "heads": 12, "dim_head": 64,
                    "module_type": "transformer", "norm_first": False, "seq_len": 19266},
        "decoder": {"hidden_dim": 512, "depth": 6, "heads": 8, "dim_head": 64,
                    "module_type": "performer", "norm_first": False, "seq_len": 19266},
        "n_class": 104, "pad_token_id": 103, "mask_token_id": 102, "bin_num": 100,
        "bin_alpha": 1.0, "rawcount": True, "mask_gene_name": False,
    }  # fmt: skip
    assert _config_from_official(released, "released") == CONFIGS["scfoundation"]


def save_variant(tmp_path: Path, raw: dict, *, state=None, config=None, extra=None) -> Path:
    """Write a one-sub-model copy ({'cell': ...}) with modified state dict / config entries."""
    sub = dict(raw["cell"])
    state_dict = dict(sub["state_dict"])
    for key, tensor in (state or {}).items():
        if tensor is None:
            del state_dict[key]
        else:
            state_dict[key] = tensor
    model_config = dict(sub["config"]["model_config"]["mae_autobin"])
    model_config |= config or {}
    sub["config"] = {**sub["config"], "model_config": {"mae_autobin": model_config}}
    sub["state_dict"] = state_dict
    sub |= extra or {}
    path = tmp_path / "variant.ckpt"
    torch.save({"cell": sub}, path)
    return path


def test_extra_lightning_entries_are_ignored(tmp_path, raw_checkpoint):
    extra = {"epoch": 3, "global_step": 37000, "optimizer_states": [{"lr": 1e-4}]}
    path = save_variant(tmp_path, raw_checkpoint, extra=extra)
    config, state_dict, metadata = read_scfoundation_checkpoint(path)
    assert metadata["extra_entries"] == ["epoch", "global_step", "optimizer_states"]
    assert metadata["available_checkpoints"] == ["cell"]
    XTrimoGeneModule(config).load_state_dict(state_dict)


def test_legacy_serialisation_is_read(tmp_path, raw_checkpoint):
    path = tmp_path / "legacy.ckpt"
    torch.save({"cell": raw_checkpoint["cell"]}, path, _use_new_zipfile_serialization=False)
    _, state_dict, _ = read_scfoundation_checkpoint(path, "cell")
    _, reference, _ = read_scfoundation_checkpoint(CHECKPOINT, "cell")
    assert all(torch.equal(state_dict[key], reference[key]) for key in reference)


def test_unknown_sub_model():
    with pytest.raises(
        ValueError, match=r"no sub-model 'ce'; available keys: \['cell', 'gene', 'rde'\]"
    ):
        read_scfoundation_checkpoint(CHECKPOINT, "ce")


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            {"model.decoder_embed.weight": torch.zeros(31, 64)},
            r"'model\.decoder_embed\.weight'.*shape \(31, 64\).*implies \(32, 64\)",
        ),
        (
            {"model.encoder.transformer_encoder.1.norm2.bias": None},
            r"missing 1 tensor.*encoder\.layers\.1\.ff_norm\.bias",
        ),
        ({"model.cls_head.weight": torch.zeros(3, 64)}, r"not part of.*model\.cls_head\.weight"),
        (
            {"model.decoder.performer.net.layers.2.0.norm.weight": torch.zeros(32)},
            r"not part of.*layers\.2\.0\.norm\.weight",
        ),
        ({"model.pos_emb.weight": torch.zeros(19267, 64, dtype=torch.int64)}, "floating-point"),
    ],
)
def test_bad_state_dict(tmp_path, raw_checkpoint, state, message):
    path = save_variant(tmp_path, raw_checkpoint, state=state)
    with pytest.raises(ValueError, match=message):
        read_scfoundation_checkpoint(path)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"pad_token_id": 0}, "pad_token_id"),
        ({"seq_len": 1000}, "differs from seq_len"),
        ({"decoder": {"module_type": "transformer"}}, "'performer'"),
        ({"bin_num": "100"}, "must be an integer"),
        ({"mask_gene_name": True}, "mask_gene_name"),
    ],
)
def test_bad_config(tmp_path, raw_checkpoint, config, message):
    if "decoder" in config:
        config = {
            "decoder": {
                **raw_checkpoint["cell"]["config"]["model_config"]["mae_autobin"]["decoder"],
                **config["decoder"],
            }
        }
    path = save_variant(tmp_path, raw_checkpoint, config=config)
    with pytest.raises(ValueError, match=message):
        read_scfoundation_checkpoint(path)


def test_bad_structure(tmp_path, raw_checkpoint):
    path = tmp_path / "model_name.ckpt"
    sub = dict(raw_checkpoint["cell"])
    sub["config"] = {**sub["config"], "model": "performergau_resolution"}
    torch.save({"cell": sub}, path)
    with pytest.raises(ValueError, match="'mae_autobin' model is supported"):
        read_scfoundation_checkpoint(path)
    torch.save({"cell": {"config": sub["config"]}}, path)
    with pytest.raises(ValueError, match="no 'state_dict' entry"):
        read_scfoundation_checkpoint(path)
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="holds a list"):
        read_scfoundation_checkpoint(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scfoundation_checkpoint(tmp_path / "absent.ckpt")
    with pytest.raises(ValueError, match="not a regular file"):
        read_scfoundation_checkpoint(tmp_path)
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(ValueError, match=r"empty\.ckpt.*is empty"):
        read_scfoundation_checkpoint(empty)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(CHECKPOINT.read_bytes()[: CHECKPOINT.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.ckpt.*truncated or corrupted"):
        read_scfoundation_checkpoint(truncated)
    text = tmp_path / "counts.csv"
    text.write_text("cell,GAPDH\nc1,3\n")
    with pytest.raises(ValueError, match=r"counts\.csv.*is not a PyTorch checkpoint"):
        read_scfoundation_checkpoint(text)


class _Payload:
    """Unpickling this object creates a file: stands in for arbitrary code execution."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_hostile_pickle_is_refused_without_running(tmp_path, raw_checkpoint):
    # The payload is real: a plain unpickle runs it.
    probe = tmp_path / "probe.txt"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    target = tmp_path / "pwned.txt"
    top_level = tmp_path / "hostile.ckpt"
    torch.save({"cell": _Payload(target)}, top_level)
    nested = save_variant(tmp_path, raw_checkpoint, extra={"callbacks": _Payload(target)})
    for path in (top_level, nested):
        with pytest.raises(
            ValueError, match=r"non-tensor Python objects.*refused for safety.*io\.open"
        ):
            read_scfoundation_checkpoint(path)
    assert not target.exists()
