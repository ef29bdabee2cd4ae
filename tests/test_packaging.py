"""The wheel carries the vocabulary and the datasets, and works outside the source tree."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("scxtrimo-*.whl")
    return path


def test_wheel_contents_and_size(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "scxtrimo/_resources/OS_scRNA_gene_index.19264.tsv",
        "scxtrimo/_resources/vocabulary_ensembl.tsv",
        "scxtrimo/_resources/NOTICE",
        "scxtrimo/datasets/pbmc4k.h5ad",
        "scxtrimo/_resources/pretrained/model.pt",
        "scxtrimo/_resources/pretrained/model.json",
        "scxtrimo/py.typed",
    ):
        assert needed in names
    assert not any(n.startswith("tests/") for n in names)
    assert not any("__pycache__" in n or n.endswith(".nbc") for n in names)
    assert wheel.stat().st_size < 20 * 2**20
    # Package data (datasets, vocabulary, the pretrained model) stays within 15 MB.
    info = zipfile.ZipFile(wheel).infolist()
    data = sum(i.file_size for i in info if not i.filename.endswith((".py", ".typed")))
    assert data <= 15e6, f"{data / 1e6:.1f} MB of package data"


@pytest.mark.slow
def test_installed_wheel_runs(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-compile",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import scxtrimo, numpy as np\n"
        f"assert scxtrimo.__file__.startswith({str(target)!r}), scxtrimo.__file__\n"
        "from scxtrimo.model import XTrimoGene\n"
        "adata = scxtrimo.datasets.pbmc4k()[:10].copy()\n"
        "scxtrimo.settings.progress_bar = False\n"
        "scxtrimo.tl.embed(adata, XTrimoGene(None, config='tiny'))\n"
        "assert np.isfinite(adata.obsm['X_scxtrimo']).all()\n"
        "scxtrimo.tl.embed(adata, key_added='X_default')  # the shipped model, offline\n"
        "assert adata.obsm['X_default'].shape == (10, 512)\n"
        "print('ok', scxtrimo.__version__)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith("ok")
    cli = subprocess.run(
        [sys.executable, "-m", "scxtrimo", "demo", "--help"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert cli.returncode == 0
    assert "PBMC" in cli.stdout
