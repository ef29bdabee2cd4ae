import subprocess
import sys

import scxtrimo


def test_import_is_light():
    code = (
        "import sys, scxtrimo, scxtrimo.data, scxtrimo.tl, scxtrimo.datasets;"
        "heavy = [m for m in ('lightning', 'scvi', 'pytorch_lightning') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_version_single_source():
    from importlib.metadata import version

    assert scxtrimo.__version__ == version("scxtrimo")


def test_public_namespaces():
    for name in ("model", "module", "data", "tl", "pl", "datasets", "train"):
        assert hasattr(scxtrimo, name)
    assert scxtrimo.model.XTrimoGene.__name__ == "XTrimoGene"
    assert scxtrimo.module.XTrimoGeneModule.__name__ == "XTrimoGeneModule"
    assert callable(scxtrimo.tl.embed)
