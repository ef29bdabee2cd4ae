"""precision= for inference: bf16 autocast and int8 encoder linear layers, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scxtrimo
from scxtrimo.inference import Int8DynamicLinear, check_precision, quantized_copy


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


needs_bf16 = pytest.mark.skipif(
    not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()),
    reason="CPU without AVX512-BF16 or AMX",
)
needs_int8 = pytest.mark.skipif(
    not (torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()),
    reason="CPU without VNNI or AMX",
)


@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=needs_bf16),
                                       pytest.param("int8", marks=needs_int8)])  # fmt: skip
def test_precision_close_to_fp32_and_model_unchanged(pbmc, tiny_model, precision):
    cells = pbmc[:30].copy()
    before = {k: v.clone() for k, v in tiny_model.module.state_dict().items()}
    ref = tiny_model.get_latent_representation(cells)
    z = tiny_model.get_latent_representation(cells, precision=precision)
    assert z.dtype == np.float32
    assert z.shape == ref.shape
    assert np.isfinite(z).all()
    assert _cosine(z, ref).min() > 0.9
    assert not np.array_equal(z, ref)  # it really ran another path
    after = tiny_model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(
        type(m) is torch.nn.Linear
        for m in tiny_model.module.encoder.modules()
        if isinstance(m, torch.nn.Linear | Int8DynamicLinear)
    )


@needs_int8
def test_tl_embed_int8_records_precision(pbmc, tiny_model):
    cells = pbmc[:20].copy()
    scxtrimo.tl.embed(cells, tiny_model, precision="int8")
    assert cells.uns["scxtrimo"]["X_scxtrimo"]["precision"] == "int8"
    ref = tiny_model.get_latent_representation(cells)
    assert _cosine(cells.obsm["X_scxtrimo"], ref).min() > 0.9


@needs_int8
def test_quantized_copy_cached_and_rebuilt_when_weights_change(tiny_model):
    module = tiny_model.copy().module  # its weights are changed below
    first = quantized_copy(module)
    assert quantized_copy(module) is first
    n_int8 = sum(isinstance(m, Int8DynamicLinear) for m in first.encoder.modules())
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in module.encoder.modules())
    assert n_int8 == n_linear > 0
    assert first.gene_embedding is module.gene_embedding  # shared, not copied
    with torch.no_grad():
        module.encoder.layers[0].ff_in.weight.mul_(2.0)
    assert quantized_copy(module) is not first


@needs_int8
def test_int8_linear_matches_float():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    x = torch.randn(3, 17, 64)
    with torch.inference_mode():
        ref = linear(x)
        out = Int8DynamicLinear(linear)(x)
    assert out.shape == ref.shape
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.02


def test_precision_errors(pbmc, tiny_model, monkeypatch):
    with pytest.raises(ValueError, match="precision must be"):
        tiny_model.get_latent_representation(pbmc[:5].copy(), precision="fp16")
    with pytest.raises(RuntimeError, match="CPU only"):
        check_precision("int8", torch.device("cuda"))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    with pytest.raises(RuntimeError, match="AVX512-BF16 or AMX"):
        scxtrimo.tl.embed(pbmc[:5].copy(), tiny_model, precision="bf16")
    with pytest.raises(RuntimeError, match="VNNI"):
        check_precision("int8", torch.device("cpu"))
    check_precision("fp32", torch.device("cpu"))  # always available


@needs_int8
def test_embed_to_store_int8(pbmc, tiny_model, tmp_path):
    cells = pbmc[:40].copy()
    out = scxtrimo.tl.embed_to_store(cells, tmp_path / "e.zarr", tiny_model, precision="int8")
    import anndata as ad

    stored = ad.read_zarr(out)
    ref = tiny_model.get_latent_representation(cells, precision="int8")
    np.testing.assert_allclose(stored.obsm["X_scxtrimo"], ref, rtol=1e-4, atol=1e-5)
    assert stored.uns["scxtrimo"]["X_scxtrimo"]["precision"] == "int8"


@needs_bf16
def test_cli_embed_precision(pbmc, tiny_model, tmp_path):
    from scxtrimo._cli import build_parser, main

    path = tmp_path / "in.h5ad"
    cells = pbmc[:20].copy()
    cells.write_h5ad(path)
    tiny_model.save(tmp_path / "tiny")
    out = tmp_path / "emb.zarr"
    argv = ["-q", "embed", str(path), "-o", str(out), "--model", str(tmp_path / "tiny")]
    assert main([*argv, "--precision", "bf16"]) == 0
    import anndata as ad

    stored = ad.read_zarr(out)
    assert stored.uns["scxtrimo"]["X_scxtrimo"]["precision"] == "bf16"
    ref = tiny_model.get_latent_representation(cells)
    assert _cosine(stored.obsm["X_scxtrimo"], ref).min() > 0.9
    with pytest.raises(SystemExit):
        build_parser().parse_args(["embed", str(path), "-o", str(out), "--precision", "fp16"])
