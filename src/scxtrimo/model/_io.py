"""Persistence of a model: save and load, its files, their safe reading and atomic writing, its JSON registry."""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS

from scxtrimo._settings import settings
from scxtrimo._version import __version__
from scxtrimo.inference import InputSettings, atomic_write
from scxtrimo.module import XTrimoGeneConfig

if TYPE_CHECKING:
    from ._model import XTrimoGene

logger = logging.getLogger("scxtrimo")

MODEL_FILE = "model.pt"
METADATA_FILE = "model.json"
#: LoRA fine-tuned models: the adapters and the classification head (tensors only).
LORA_FILE = "lora_adapter.pt"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------


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
    module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False
) -> None:
    """Load ``state`` into ``module`` after checking every name and shape.

    ``assign=True``: the module takes the tensors of ``state`` as its own instead of copying
    them (a module built on the ``meta`` device gets its memory this way).

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
    module.load_state_dict(state, strict=True, assign=assign)


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------


def write_model_files(
    weights: Path, metadata_path: Path, state: dict[str, torch.Tensor], metadata: dict
) -> None:
    """Write the weights (tensors only) and the metadata (JSON), each atomically."""
    atomic_write(weights, lambda f: torch.save(state, f))
    atomic_write(
        metadata_path, lambda f: f.write(json.dumps(metadata, indent=1, default=str).encode())
    )


def saved_metadata(model: Any) -> dict:
    """What ``model.json`` records: format, versions, architecture, input settings, history."""
    return {
        "format": "scxtrimo-model",
        "format_version": FORMAT_VERSION,
        "scxtrimo_version": __version__,
        "model_class": type(model).__name__,
        "config": model.config.to_dict(),
        "setup_args": model.setup_args,
        "default_target_depth": model.default_target_depth_,
        "default_max_genes": model.default_max_genes_,
        "source": model.source_,
        "seed": model.seed_,
        "is_trained": bool(model.is_trained_),
        "training_args": getattr(model, "training_args_", None),
        "history": history_to_json(model.history_),
        "adaptation": jsonable(getattr(model, "adaptation_", None)),
        "registry": jsonable(model.registry_),
        "classifier": jsonable(model.classifier_),
        "n_parameters": int(sum(p.numel() for p in model.module.parameters())),
    }


def restore_saved_attributes(model: Any, metadata: dict) -> None:
    """Set the attributes :func:`saved_metadata` recorded (defaults for older files) on ``model``."""
    model.default_target_depth_ = metadata.get("default_target_depth", "fold:1")
    model.default_max_genes_ = metadata.get("default_max_genes")
    model.source_ = metadata.get("source", "scxtrimo")
    model.is_trained_ = bool(metadata.get("is_trained", True))
    model.training_args_ = metadata.get("training_args")
    if metadata.get("history"):
        model.history_ = history_from_json(metadata["history"])
    model.adaptation_ = metadata.get("adaptation")


def lora_file_state(model: Any) -> dict[str, torch.Tensor] | None:
    """What ``lora_adapter.pt`` holds for a LoRA fine-tuned model (else ``None``).

    The adapter tensors of the last ``train(finetune="lora")`` run and the classification
    head; ``model.json`` records the adapters' configuration and their base's fingerprint
    (``classifier["lora"]``).
    """
    adapters = getattr(model, "lora_state_", None)
    if not adapters or not (model.classifier_ or {}).get("lora"):
        return None
    head = {
        f"classifier.{k}": v.detach().cpu() for k, v in model.module.classifier.state_dict().items()
    }
    return {**{k: v.detach().cpu() for k, v in adapters.items()}, **head}


def read_lora_files(
    dir_path: str | os.PathLike, prefix: str | None = None
) -> tuple[dict, dict[str, torch.Tensor], str]:
    """Read the metadata and adapter file of a saved LoRA fine-tuned model.

    Returns
    -------
    The metadata (``model.json``), the adapter and head tensors, and the adapter file's path.

    Raises
    ------
    ValueError
        If the saved model was not fine-tuned with LoRA (no adapters recorded or saved).
    """
    path = Path(dir_path)
    prefix = prefix or ""
    metadata = read_metadata(path / f"{prefix}{METADATA_FILE}", expected_class="XTrimoGene")
    source = path / f"{prefix}{LORA_FILE}"
    lora = (metadata.get("classifier") or {}).get("lora")
    if not lora or not source.exists():
        raise ValueError(
            f"{path} holds no LoRA adapters ({'no ' + LORA_FILE if lora else 'not fine-tuned with LoRA'}): "
            "only a model fine-tuned with model.train(finetune='lora') and saved with "
            "model.save(...) has them. Load it with XTrimoGene.load(dir_path)."
        )
    return metadata, read_state_dict(source), str(source)


# ----------------------------------------------------------------------------------------
# JSON form of the registry, history and classification head
# ----------------------------------------------------------------------------------------


def empty_registry(model_name: str, setup_args: Mapping[str, Any]) -> dict:
    """A registry for a model without AnnData (inference only)."""
    return {
        "scvi_version": "",
        "model_name": model_name,
        "setup_method_name": "setup_anndata",
        "setup_args": dict(setup_args),
        "field_registries": {},
    }


def jsonable(obj: Any) -> Any:
    """``obj`` with arrays and numpy scalars as JSON values (arrays keep their dtype)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def from_jsonable(obj: Any) -> Any:
    """The inverse of :func:`jsonable` for arrays."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj.get("dtype") or None)
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj


def registry_from_json(
    registry: dict | None, model_name: str, setup_args: Mapping[str, Any]
) -> dict:
    """The saved registry, or an empty one (with ``setup_args``) if none was saved."""
    if not registry:
        return empty_registry(model_name, setup_args)
    return from_jsonable(registry)


def history_to_json(history: dict[str, pd.DataFrame] | None) -> dict | None:
    """Training history as JSON columns (the epoch index becomes a column)."""
    if history is None:
        return None
    return {k: v.reset_index().to_dict(orient="list") for k, v in history.items()}


def history_from_json(history: dict) -> dict[str, pd.DataFrame]:
    """The inverse of :func:`history_to_json`."""
    return {
        k: pd.DataFrame(v).set_index("epoch") if "epoch" in v else pd.DataFrame(v)
        for k, v in history.items()
    }


def registered_labels(registry: dict | None) -> tuple[str | None, list]:
    """``(labels_key, categories)`` registered for the labels; ``(None, [])`` without labels."""
    registry = registry or {}
    labels_key = (registry.get("setup_args") or {}).get("labels_key")
    if labels_key is None:
        return None, []
    field = (registry.get("field_registries") or {}).get(REGISTRY_KEYS.LABELS_KEY) or {}
    mapping = (field.get("state_registry") or {}).get("categorical_mapping")
    if mapping is None:
        return labels_key, []
    return labels_key, [c.item() if isinstance(c, np.generic) else c for c in mapping]


def classifier_info(labels_key: str | None, categories: Sequence) -> dict:
    """What the saved model records about its classification head."""
    return {
        "labels_key": labels_key,
        "categories": [c.item() if isinstance(c, np.generic) else c for c in categories],
        "trained": False,
        "finetune": None,
        "n_last_layers": None,
        "max_genes": None,
        "lora": None,
    }


# ----------------------------------------------------------------------------------------
# The save and load methods
# ----------------------------------------------------------------------------------------


class SaveLoadMixin:
    """``save``, ``load`` and ``from_scfoundation`` of :class:`~scxtrimo.model.XTrimoGene`."""

    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model: weights (``model.pt``) and metadata (``model.json``).

        A model fine-tuned with ``train(finetune="lora")`` is saved merged (``model.pt`` holds
        the base weights plus the adapters, loaded and used like any model, as fast as the
        base), and its adapters and head are written beside it (``lora_adapter.pt``, a few
        MB) with the SHA-256 of the base they were trained on in ``model.json``: share the
        small file and rebuild the model from its base with :meth:`apply_lora`.

        The weights file holds only tensors, so :meth:`load` reads it with
        ``torch.load(weights_only=True)``; the metadata record the scxtrimo version, the
        architecture and how the model reads an AnnData.

        Parameters
        ----------
        dir_path
            Directory to write (created).
        prefix
            Prefix for the file names.
        overwrite
            Replace an existing directory's model files.
        save_anndata
            Also write the registered AnnData as ``adata.h5ad``.
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad`.
        """
        path = Path(dir_path)
        prefix = prefix or ""
        weights = path / f"{prefix}{MODEL_FILE}"
        if weights.exists() and not overwrite:
            raise FileExistsError(f"{weights} exists; pass overwrite=True to replace it.")
        path.mkdir(parents=True, exist_ok=True)
        if save_anndata:
            if self.adata is None:
                raise ValueError("save_anndata=True but the model has no AnnData.")
            self.adata.write_h5ad(path / f"{prefix}adata.h5ad", **anndata_write_kwargs)
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        lora = lora_file_state(self)
        if lora is not None:  # LoRA: the adapters beside the merged model (apply_lora)
            atomic_write(path / f"{prefix}{LORA_FILE}", lambda f: torch.save(lora, f))
        else:
            (path / f"{prefix}{LORA_FILE}").unlink(missing_ok=True)
        write_model_files(weights, path / f"{prefix}{METADATA_FILE}", state, saved_metadata(self))

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        *,
        device: str | None = None,
        prefix: str | None = None,
    ) -> XTrimoGene:
        """Load a model written by :meth:`save`.

        Weights are read with ``torch.load(weights_only=True)``: a file crafted to run code on
        load is refused. The metadata and every tensor name and shape are checked against the
        architecture before anything is loaded.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            AnnData to attach (set up with the saved arguments); ``None`` for inference only.
        device
            Device to put the model on (default ``scxtrimo.settings.device``).
        prefix
            File-name prefix used when saving.
        """
        path = Path(dir_path)
        prefix = prefix or ""
        metadata = read_metadata(path / f"{prefix}{METADATA_FILE}", expected_class=cls.__name__)
        config = XTrimoGeneConfig.from_dict(metadata["config"])
        state = read_state_dict(path / f"{prefix}{MODEL_FILE}")
        registry = registry_from_json(
            metadata.get("registry"), cls.__name__, InputSettings().to_dict()
        )
        classifier = metadata.get("classifier") or None
        if adata is not None:
            setup = {k: v for k, v in metadata["setup_args"].items() if v is not None}
            key = (classifier or {}).get("labels_key")
            if key in adata.obs.columns and adata.obs[key].notna().all():
                setup["labels_key"] = key  # labelled data: ready to fine-tune further
            cls.setup_anndata(adata, **setup)
            model = cls(adata, config=config, seed=metadata.get("seed"))
        else:
            model = cls(None, config=config, seed=metadata.get("seed"), registry=registry)
            model.registry_["setup_args"] = dict(metadata["setup_args"])
        # The head is the one that was saved, whatever the attached data registers.
        model._set_classifier(
            (classifier or {}).get("categories") or [],
            (classifier or {}).get("labels_key"),
            info=classifier,
        )
        load_state_dict_checked(model.module, state, source=str(path / f"{prefix}{MODEL_FILE}"))
        restore_saved_attributes(model, metadata)
        lora_path = path / f"{prefix}{LORA_FILE}"
        if (classifier or {}).get("lora") and lora_path.exists():
            saved = read_state_dict(lora_path)
            model.lora_state_ = {k: v for k, v in saved.items() if not k.startswith("classifier.")}
        model.to_device(settings.resolve_device(device))
        model.module.eval()
        return model

    @classmethod
    def from_scfoundation(
        cls,
        path: str | os.PathLike | None = None,
        adata: AnnData | None = None,
        *,
        checkpoint: Literal["cell", "rde", "gene"] = "cell",
        device: str | None = None,
        url: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        sha256: str | None = "auto",
        force_download: bool = False,
    ) -> XTrimoGene:
        """Load the official scFoundation checkpoint (``models.ckpt``).

        The file holds three sub-models: ``"cell"`` for cell embeddings, ``"rde"`` for
        read-depth-enhanced cell embeddings (use with ``target_depth`` above the cell's depth,
        e.g. ``"add:1"``), ``"gene"`` for gene embeddings and predicted expression. The file is
        read with ``torch.load(weights_only=True, mmap=True)`` (never unpickling code, and
        reading only the chosen sub-model from disk); its structure and every tensor shape are
        validated before loading. The scFoundation weights are for non-commercial research
        only (scFoundation License); scxtrimo does not ship them.

        Without ``path``, the file is downloaded once from the Hugging Face mirror
        ``genbio-ai/scFoundation`` (or from ``url``) into a cache, checked against the expected
        SHA-256 and size, and read from the cache afterwards without any request (see
        :doc:`/scfoundation`; offline, pass the path of a file you downloaded yourself).

        Parameters
        ----------
        path
            Path to ``models.ckpt``; ``None`` downloads it (or finds it in the cache).
        adata
            AnnData with raw counts to attach (optional).
        checkpoint
            Which sub-model to load.
        device
            Device to put the model on.
        url
            Download from this http(s) URL instead of the Hugging Face mirror (resumable).
        revision
            Branch, tag or commit of the mirror (default ``"main"``); a commit pins the file.
        cache_dir
            Cache folder (default: the Hugging Face cache, or scxtrimo's for ``url``).
        sha256
            Expected SHA-256: ``"auto"`` checks a download against the official file's
            (and a local ``path`` not at all), a digest checks any file, ``None`` skips the
            check. The environment variable ``SCXTRIMO_ACCEPT_CHECKPOINT_SHA256`` names
            digests to accept as well.
        force_download
            Download again even if the file is cached.
        """
        from ._download import scfoundation_checkpoint
        from ._scfoundation import LICENSE_NOTICE, read_scfoundation_checkpoint

        path = scfoundation_checkpoint(
            path,
            url=url,
            revision=revision,
            cache_dir=cache_dir,
            sha256=sha256,
            force_download=force_download,
        )
        config, state, _meta = read_scfoundation_checkpoint(path, checkpoint=checkpoint)
        logger.info(LICENSE_NOTICE)
        if adata is not None:
            cls.setup_anndata(adata)
        # The module is built without memory (meta) and takes the file's tensors as its own:
        # no random initialisation of 100M weights, and no second copy of them. The tensors of
        # a zip-format file are memory-mapped copy-on-write, so only the pages the model reads
        # (the encoder's, for cell embeddings) become resident.
        with torch.device("meta"):
            model = cls(adata, config=config)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        load_state_dict_checked(model.module, state, source=f"{path} [{checkpoint}]", assign=True)
        model.default_target_depth_ = "t4"  # the official default (--tgthighres t4)
        model.source_ = f"scfoundation:{checkpoint}"
        model.is_trained_ = True
        model.to_device(settings.resolve_device(device))
        model.module.eval()
        return model
