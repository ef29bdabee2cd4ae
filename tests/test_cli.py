"""The command line, run in-process through its entry point."""

import argparse
import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from scxtrimo._cli import build_parser, main


@pytest.fixture
def h5ad(pbmc, tmp_path):
    path = tmp_path / "in.h5ad"
    pbmc[:40].copy().write_h5ad(path)
    return path


@pytest.fixture
def saved_tiny(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_embed_writes_copy_with_embedding(h5ad, saved_tiny, tiny_model, tmp_path):
    before = h5ad.read_bytes()
    out = tmp_path / "out" / "emb.h5ad"
    assert main(["-q", "embed", str(h5ad), "-o", str(out), "--model", str(saved_tiny)]) == 0
    assert h5ad.read_bytes() == before  # the input is never touched
    result = ad.read_h5ad(out)
    original = ad.read_h5ad(h5ad)
    assert (result.X != original.X).nnz == 0
    expected = tiny_model.get_latent_representation(original)
    np.testing.assert_allclose(result.obsm["X_scxtrimo"], expected, atol=1e-6)
    assert result.uns["scxtrimo"]["X_scxtrimo"]["pooling"] == "all"
    assert not list(out.parent.glob(".*.tmp"))  # no temporary file left behind


def test_embed_refuses_to_overwrite(h5ad, saved_tiny, tmp_path):
    with pytest.raises(SystemExit, match="must not be the input"):
        main(["embed", str(h5ad), "-o", str(h5ad), "--model", str(saved_tiny)])
    out = tmp_path / "exists.h5ad"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["embed", str(h5ad), "-o", str(out), "--model", str(saved_tiny)])
    assert out.read_bytes() == b"keep me"


def test_failed_embed_leaves_no_output(h5ad, tmp_path):
    out = tmp_path / "never.h5ad"
    with pytest.raises(FileNotFoundError):
        main(["-q", "embed", str(h5ad), "-o", str(out), "--model", str(tmp_path / "missing")])
    assert not out.exists()


@pytest.mark.slow
def test_pretrain_then_embed(h5ad, tmp_path):
    model_dir = tmp_path / "model"
    args = ["-q", "pretrain", str(h5ad), "-o", str(model_dir), "--config", "tiny"]
    assert main([*args, "--max-epochs", "1", "--batch-size", "16", "--max-genes", "128"]) == 0
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["is_trained"]
    assert meta["training_args"]["max_epochs"] == 1
    out = tmp_path / "emb.h5ad"
    assert main(["-q", "embed", str(h5ad), "-o", str(out), "--model", str(model_dir)]) == 0
    assert ad.read_h5ad(out).obsm["X_scxtrimo"].shape == (40, 4 * 32)


@pytest.mark.slow
def test_demo_runs_on_shipped_data(saved_tiny, tmp_path, capsys):
    out = tmp_path / "demo"
    main(["-q", "demo", "--out", str(out), "--model", str(saved_tiny), "--max-cells", "300"])
    text = capsys.readouterr().out
    assert "kNN (k=15, 5-fold) cell-type accuracy" in text
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["knn15_5fold_accuracy_scxtrimo"] <= 1.0
    assert (out / "pbmc4k_scxtrimo_umap.png").stat().st_size > 10_000
    assert ad.read_h5ad(out / "pbmc4k_scxtrimo.h5ad").obsm["X_scxtrimo"].shape[0] == 300


def test_module_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "scxtrimo", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "PBMC" in out.stdout


def _subcommand_parsers():
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"scxtrimo": parser, **sub.choices}


def test_every_option_has_help():
    undocumented = [
        f"{name} {action.option_strings[0]}"
        for name, parser in _subcommand_parsers().items()
        for action in parser._actions
        if action.option_strings and not action.help
    ]
    assert undocumented == []


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("embed", "(default: 16384)"),  # --max-tokens
        ("embed", "(default: all)"),  # --pooling
        ("pretrain", "(default: 0.001)"),  # --lr
        ("pretrain", "(default: small)"),  # --config
        ("pretrain", "(default: 10)"),  # --max-epochs
        ("demo", "(default: scxtrimo_demo)"),  # --out
    ],
)
def test_help_shows_defaults(command, shown):
    text = " ".join(_subcommand_parsers()[command].format_help().split())
    assert shown in text


def test_help_hides_unset_defaults():
    text = _subcommand_parsers()["embed"].format_help()
    assert "(default: None)" not in text
    assert "(default: False)" not in text


def test_adapt_then_embed(pbmc, saved_tiny, tmp_path):
    h5ad = tmp_path / "cells.h5ad"
    pbmc.write_h5ad(h5ad)  # 120 cells: adapt needs at least 50
    model_dir = tmp_path / "adapted"
    args = ["-q", "adapt", str(h5ad), "-o", str(model_dir), "--model", str(saved_tiny)]
    assert main([*args, "--max-steps", "3", "--batch-size", "16"]) == 0
    before = ad.read_h5ad(h5ad)
    assert "X_scxtrimo" not in before.obsm  # the input file is read, never written
    from scxtrimo.model import XTrimoGene

    adapted = XTrimoGene.load(model_dir)
    assert adapted.adaptation_["result"]["steps"] == 3
    assert adapted.config.cell_head_dim == 64
    out = tmp_path / "out.h5ad"
    assert main(["-q", "embed", str(h5ad), "-o", str(out), "--model", str(model_dir)]) == 0
    assert ad.read_h5ad(out).obsm["X_scxtrimo"].shape[1] == 64
    with pytest.raises(SystemExit, match="not empty"):
        main([*args, "--max-steps", "3"])
