"""The engine's front door: scvi-free import, one value for the input settings, module calls."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import scxtrimo
from scxtrimo._docs import doc_params
from scxtrimo.inference import InputSettings, embed_prepared, iter_decoder, prepare_input


def test_engine_imports_neither_scvi_nor_lightning():
    code = (
        "import sys, scxtrimo.inference, scxtrimo.metrics;"
        "print([m for m in ('lightning', 'scvi') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_input_settings_merge_keeps_none_and_refuses_unknown_names():
    base = InputSettings(layer="counts", gene_ids_key="ids")
    merged = base.merge(layer=None, gene_symbols_key="symbol", input_type="log1p")
    assert merged == InputSettings(
        layer="counts", gene_symbols_key="symbol", gene_ids_key="ids", input_type="log1p"
    )
    assert base.merge(layer=None) is base
    assert base.layer == "counts"  # frozen: merge returns a new value
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.layer = "x"
    with pytest.raises(TypeError, match="Unexpected arguments"):
        base.merge(batch_key="batch")
    with pytest.raises(ValueError, match="input_type"):
        InputSettings(input_type="tpm")
    assert InputSettings.from_mapping({"layer": "x", "labels_key": "y"}).to_dict() == {
        **InputSettings().to_dict(),
        "layer": "x",
    }


def test_engine_on_the_module_equals_the_model_methods(pbmc, tiny_model):
    cells = pbmc[:40].copy()
    prep = prepare_input(
        cells,
        tiny_model.input_settings,
        n_genes=tiny_model.config.n_genes,
        target_depth="fold:1",
        max_genes=tiny_model.default_max_genes,
    )
    np.testing.assert_allclose(
        embed_prepared(tiny_model.module, prep, progress_bar=False),
        tiny_model.get_latent_representation(cells, target_depth="fold:1", progress_bar=False),
        atol=1e-5,
    )
    genes = ["CD3E", "MS4A1"]
    rows = np.array([5, 2, 9])
    chunks = list(
        iter_decoder(
            tiny_model.module,
            prep.with_cells(rows),
            output="expression",
            genes=genes,
            batch_size=2,
            progress_bar=False,
        )
    )
    assert [list(c) for c, _ in chunks] == [[5, 2], [9]]
    np.testing.assert_allclose(
        np.concatenate([v for _, v in chunks]),
        tiny_model.get_expression(
            cells, rows, genes=genes, target_depth="fold:1", progress_bar=False
        ),
        atol=1e-5,
    )


def test_doc_params_indents_shared_text_at_the_placeholder():
    @doc_params(shared="a\n    b\nc")
    def f():
        """Head.

        Parameters
        ----------
            {shared}
        """

    assert "\n            a\n                b\n            c\n" in f.__doc__
    assert "{shared}" not in f.__doc__
    assert "total_counts_key" in scxtrimo.tl.embed.__doc__
    assert "{doc_" not in scxtrimo.tl.embed.__doc__
