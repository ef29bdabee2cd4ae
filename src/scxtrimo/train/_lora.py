"""LoRA adapters on the encoder through ``peft``: injection, adapter state, merge, base fingerprint.

The adapters are peft's own (:class:`peft.LoraConfig` and :func:`peft.inject_adapter_in_model`):
each targeted :class:`torch.nn.Linear` of the encoder is replaced in place by a peft LoRA layer
that holds the frozen original (``base_layer``) and the low-rank ``lora_A`` / ``lora_B`` pair.
After training the adapters are merged into the base weights with peft's ``merge`` and the
LoRA layers are replaced by their (merged) base layers again, so the module is a plain
:class:`~scxtrimo.module.XTrimoGeneModule` that embeds exactly as fast as the base.

``peft`` is an optional dependency (``pip install scxtrimo[lora]``); it is imported only when
LoRA is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from scxtrimo.inference import model_fingerprint

if TYPE_CHECKING:
    from scxtrimo.module import XTrimoGeneModule

#: The encoder's linear layers that LoRA adapts by default: the fused query/key/value and output
#: projections of the attention and both feed-forward layers of every encoder layer.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "attention.qkv_proj",
    "attention.out_proj",
    "ff_in",
    "ff_out",
)

#: peft's name of the one adapter scxtrimo injects.
ADAPTER_NAME = "default"

_INSTALL_HINT = "pip install 'scxtrimo[lora]'"


def require_peft() -> Any:
    """Import ``peft``, or raise an :class:`ImportError` that says how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "LoRA fine-tuning (finetune='lora') needs the optional dependency peft, which is not "
            f"installed ({err}). Install it with: {_INSTALL_HINT}  (or pip install peft)."
        ) from None
    return peft


@dataclass(frozen=True)
class LoraSpec:
    """How LoRA adapts the encoder.

    Attributes
    ----------
    rank
        Rank ``r`` of each adapter (``lora_A``: ``r x in``, ``lora_B``: ``out x r``).
    alpha
        Scaling numerator: the update is ``(alpha / rank) * B @ A``.
    dropout
        Dropout on the adapters' input during training.
    targets
        Linear layers to adapt, as names inside an encoder layer (e.g. ``"attention.qkv_proj"``,
        ``"ff_in"``); ``None``: ``DEFAULT_LORA_TARGETS`` (attention and feed-forward). Every encoder layer is adapted.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"lora_rank must be a positive integer, got {self.rank!r}.")
        if not self.alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.dropout!r}.")
        if self.targets is not None:
            if isinstance(self.targets, str):
                object.__setattr__(self, "targets", (self.targets,))
            object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
            if not self.targets:
                raise ValueError("lora_targets must name at least one layer (or be None).")

    @property
    def target_names(self) -> tuple[str, ...]:
        """The targeted layer names inside an encoder layer."""
        return DEFAULT_LORA_TARGETS if self.targets is None else tuple(self.targets)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``targets`` resolved)."""
        out = asdict(self)
        out["targets"] = list(self.target_names)
        out["rank"], out["alpha"], out["dropout"] = int(self.rank), float(self.alpha), self.dropout
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            rank=int(d["rank"]),
            alpha=float(d["alpha"]),
            dropout=float(d.get("dropout", 0.0)),
            targets=tuple(d["targets"]) if d.get("targets") is not None else None,
        )


def lora_target_modules(
    module: XTrimoGeneModule, spec: LoraSpec, layers: Sequence[int] | None = None
) -> list[str]:
    """Full names (in ``module``) of the linear layers ``spec`` adapts.

    ``layers``: the encoder layers to adapt (``None``: all).

    Raises
    ------
    ValueError
        If a target names no :class:`torch.nn.Linear` of the encoder layers (listing those
        that exist).
    """
    depth = len(module.encoder.layers)
    names = []
    linear = {
        name
        for name, sub in module.encoder.layers[0].named_modules()
        if isinstance(sub, torch.nn.Linear)
    }
    unknown = [t for t in spec.target_names if t not in linear]
    if unknown:
        raise ValueError(
            f"lora_targets {unknown} are not linear layers of an encoder layer; choose from "
            f"{sorted(linear)} (default {list(DEFAULT_LORA_TARGETS)})."
        )
    for i in range(depth) if layers is None else layers:
        names += [f"encoder.layers.{i}.{t}" for t in spec.target_names]
    return names


def inject_lora(
    module: XTrimoGeneModule, spec: LoraSpec, layers: Sequence[int] | None = None
) -> list[str]:
    """Inject peft LoRA adapters into ``module``'s encoder (in place).

    ``layers``: the encoder layers to adapt (``None``: all of them).

    The adapters start as an exact no-op (``lora_B`` is zero), so the module computes what it
    computed before. peft marks only the adapters as trainable; the caller decides what else
    trains.

    Returns
    -------
    Names of the adapter parameters (as in ``module.named_parameters()``).
    """
    peft = require_peft()
    if has_lora(module):
        raise ValueError("The module already carries LoRA adapters; merge or discard them first.")
    targets = lora_target_modules(module, spec, layers)
    config = peft.LoraConfig(
        r=int(spec.rank),
        lora_alpha=float(spec.alpha),
        lora_dropout=float(spec.dropout),
        target_modules=targets,
        bias="none",
    )
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    peft.inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
    adapters = lora_parameter_names(module)
    # peft freezes everything but the adapters; give the other parameters their flags back.
    for name, param in module.named_parameters():
        if name not in adapters:
            param.requires_grad_(flags.get(name.replace(".base_layer", ""), param.requires_grad))
    return sorted(adapters)


def _lora_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft no module can carry its adapters
        return []
    return [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def has_lora(module: torch.nn.Module) -> bool:
    """Whether ``module`` carries (unmerged) peft adapters."""
    return bool(_lora_layers(module))


def lora_parameter_names(module: torch.nn.Module) -> set[str]:
    """Names of the LoRA adapter parameters of ``module``."""
    return {n for n, _ in module.named_parameters() if ".lora_" in n}


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (copies on the CPU), named as in ``module.state_dict()``."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if ".lora_" in k}


def load_lora_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved adapter tensors into the adapters of ``module`` (injected with the same spec).

    Raises
    ------
    ValueError
        If names or shapes differ (the adapters are from another configuration).
    """
    own = {k: v for k, v in module.state_dict().items() if ".lora_" in k}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"The LoRA adapters in {source} do not fit this model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}. They were trained on "
            "another architecture or with other lora_targets / lora_rank."
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(device=v.device, dtype=v.dtype))


def _replace_by_base(module: torch.nn.Module, merge: bool) -> None:
    for name, layer in _lora_layers(module):
        if merge:
            layer.merge(adapter_names=[ADAPTER_NAME])
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    # peft records its configuration on the model; the module is a plain module again.
    module.__dict__.pop("peft_config", None)


def merge_lora(module: torch.nn.Module) -> None:
    """Merge the adapters into the base weights (peft's ``merge``) and remove the LoRA layers.

    Afterwards ``module`` holds plain :class:`torch.nn.Linear` layers with ``W + (alpha / r) B A``
    and computes what the adapted module computed, at the cost of the base.
    """
    _replace_by_base(module, merge=True)


def discard_lora(module: torch.nn.Module) -> None:
    """Remove the adapters without merging (the base weights are as before injection)."""
    _replace_by_base(module, merge=False)


@contextlib.contextmanager
def _without_classifier(module: XTrimoGeneModule) -> Iterator[None]:
    head = getattr(module, "classifier", None)
    module.classifier = None
    try:
        yield
    finally:
        module.classifier = head


def base_fingerprint(module: XTrimoGeneModule) -> str:
    """SHA-256 of the weights LoRA adapters are trained on: every tensor but the head's.

    Computed with :func:`~scxtrimo.inference.model_fingerprint` on the module without its
    classification head (the head is saved with the adapters, so any base with the same
    weights fits, whatever head it has).
    """
    if has_lora(module):
        raise ValueError("The base fingerprint is defined on a module without adapters.")
    with _without_classifier(module):
        return model_fingerprint(module)["weights_sha256"]


def count_parameters(module: torch.nn.Module, names: Sequence[str]) -> int:
    """Number of scalars in the named parameters."""
    keep = set(names)
    return int(sum(p.numel() for n, p in module.named_parameters() if n in keep))
