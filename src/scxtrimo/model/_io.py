"""Safe reading of saved scxtrimo models: metadata checks, tensor-only weights."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from scxtrimo._version import __version__

SUPPORTED_FORMAT_VERSIONS = (1,)


def read_metadata(path: Path, expected_class: str) -> dict:
    """Read and check ``model.json``.

    Raises
    ------
    FileNotFoundError
        If the file is missing (the folder is not a saved scxtrimo model).
    ValueError
        If the file is not valid JSON, is from another program or model class, or from a newer
        format version.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {path.parent} is not a model saved by scxtrimo "
            "(XTrimoGene.save writes model.pt and model.json). For the official scFoundation "
            "file use XTrimoGene.from_scfoundation('models.ckpt')."
        )
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the saved model is damaged.") from None
    if not isinstance(metadata, dict) or metadata.get("format") != "scxtrimo-model":
        raise ValueError(f"{path} is not scxtrimo model metadata (no 'format': 'scxtrimo-model').")
    version = metadata.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(
            f"{path} has model format version {version}, but scxtrimo {__version__} reads "
            f"versions {SUPPORTED_FORMAT_VERSIONS}; it was written by scxtrimo "
            f"{metadata.get('scxtrimo_version', '?')}. Upgrade scxtrimo."
        )
    if metadata.get("model_class") != expected_class:
        raise ValueError(
            f"{path} holds a {metadata.get('model_class')!r} model, not {expected_class!r}."
        )
    for key in ("config", "setup_args"):
        if not isinstance(metadata.get(key), dict):
            raise ValueError(f"{path} has no valid {key!r} entry; the saved model is damaged.")
    return metadata


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a tensor-only state dict with ``torch.load(weights_only=True)``.

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        If the file is empty, truncated, not a torch file, holds Python objects other than
        tensors (refused, nothing is executed), or is not a flat name -> tensor mapping.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Model weights {path} not found.")
    if path.stat().st_size == 0:
        raise ValueError(f"Model weights {path} are empty (0 bytes); the file is damaged.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"Refused to load {path}: it contains Python objects other than tensors, which "
            "could run code when loaded. Only files written by XTrimoGene.save are accepted. "
            f"({str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"Cannot read model weights {path}: the file is truncated or not a PyTorch file "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} is not a state dict (a mapping of names to tensors).")
    return state


def load_state_dict_checked(
    module: torch.nn.Module, state: dict[str, torch.Tensor], source: str
) -> None:
    """Load ``state`` into ``module`` after checking every name and shape.

    Raises
    ------
    ValueError
        Naming the missing, unexpected or mis-shaped tensors and the file they came from.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:5]}{' …' if len(wrong) > 5 else ''}")
    if problems:
        raise ValueError(
            f"The weights in {source} do not fit this architecture: {'; '.join(problems)}. "
            "The file is from another model or configuration."
        )
    module.load_state_dict(state, strict=True)
