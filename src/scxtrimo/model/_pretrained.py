"""The pretrained model shipped inside the package (the default of ``tl.embed``), and model lookup."""

from __future__ import annotations

import os
from importlib.resources import as_file, files
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._model import XTrimoGene

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


def resolve_model(model: Any = None, *, device: str | None = None) -> XTrimoGene:
    """Turn what a user passed as ``model`` into an :class:`~scxtrimo.model.XTrimoGene`.

    Parameters
    ----------
    model
        An :class:`~scxtrimo.model.XTrimoGene`; a directory written by
        :meth:`~scxtrimo.model.XTrimoGene.save`; the official scFoundation checkpoint file
        (``models.ckpt``, its ``"cell"`` sub-model); the string ``"scfoundation"`` for the
        official weights, downloaded once and then read from the cache
        (:meth:`~scxtrimo.model.XTrimoGene.from_scfoundation` without a path); or ``None`` for
        the pretrained model shipped with scxtrimo.
    device
        Device for a model loaded here.
    """
    from ._model import XTrimoGene

    if isinstance(model, XTrimoGene):
        return model
    if model is None:
        return load_default_model(device=device)
    if isinstance(model, str) and model == "scfoundation":
        return XTrimoGene.from_scfoundation(checkpoint="cell", device=device)
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if path.is_dir():
            return XTrimoGene.load(path, device=device)
        if path.is_file():
            return XTrimoGene.from_scfoundation(path, checkpoint="cell", device=device)
        raise FileNotFoundError(
            f"model={str(model)!r} does not exist. Pass an XTrimoGene, a folder written by "
            "XTrimoGene.save, the scFoundation 'models.ckpt' file, 'scfoundation' (the official "
            "weights, downloaded) or None for the default model."
        )
    raise TypeError(f"model must be an XTrimoGene, a path or None, not {type(model).__name__}.")
