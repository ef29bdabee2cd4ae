"""The pretrained model shipped inside the package (the default of ``tl.embed``)."""

from __future__ import annotations

from importlib.resources import as_file, files

PRETRAINED_DIR = "pretrained"


def _location():
    return files("scxtrimo") / "_resources" / PRETRAINED_DIR


def default_model_available() -> bool:
    """Whether this installation carries the pretrained default model."""
    return (_location() / "model.json").is_file()


def load_default_model(device: str | None = None):
    """Load the pretrained model shipped with scxtrimo (works offline).

    Raises
    ------
    FileNotFoundError
        If this installation has no shipped model.
    """
    from ._model import XTrimoGene

    if not default_model_available():
        raise FileNotFoundError(
            "This scxtrimo installation has no pretrained default model. Pass a model: "
            "an XTrimoGene you trained (XTrimoGene.setup_anndata(adata); m = XTrimoGene(adata); "
            "m.train()), a folder saved with XTrimoGene.save, or the scFoundation "
            "'models.ckpt'."
        )
    with as_file(_location()) as path:
        return XTrimoGene.load(path, device=device)
