"""Package-wide settings: verbosity, device, threads, progress bars and seeds."""

from __future__ import annotations

import logging
from typing import Literal

logger = logging.getLogger("scxtrimo")

_LEVELS = {
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


class ScxtrimoSettings:
    """Settings of scxtrimo, available as ``scxtrimo.settings``.

    Attributes
    ----------
    verbosity
        Log level of the ``scxtrimo`` logger: ``"error"``, ``"warning"``, ``"info"`` (default)
        or ``"debug"``, or a :mod:`logging` level number.
    device
        Default device for inference: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``,
        ``"cuda"``, ``"cuda:1"``...
    progress_bar
        Show progress bars for long work (embedding, training).
    seed
        Default random seed for training (masking, down-sampling, initialisation).
    """

    def __init__(self) -> None:
        self._verbosity: int = logging.INFO
        self.device: str = "auto"
        self.progress_bar: bool = True
        self.seed: int = 0
        self._configure_logger()

    def _configure_logger(self) -> None:
        logger.setLevel(self._verbosity)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s scxtrimo: %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False

    @property
    def verbosity(self) -> int:
        """Current log level (a :mod:`logging` level number)."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, level: int | Literal["error", "warning", "info", "debug"]) -> None:
        if isinstance(level, str):
            if level.lower() not in _LEVELS:
                raise ValueError(f"verbosity must be one of {list(_LEVELS)}, got {level!r}.")
            level = _LEVELS[level.lower()]
        self._verbosity = int(level)
        logger.setLevel(self._verbosity)

    @property
    def n_threads(self) -> int:
        """Number of CPU threads PyTorch uses (``torch.set_num_threads``)."""
        import torch

        return torch.get_num_threads()

    @n_threads.setter
    def n_threads(self, n: int) -> None:
        import torch

        if n < 1:
            raise ValueError(f"n_threads must be >= 1, got {n}.")
        torch.set_num_threads(int(n))

    def resolve_device(self, device: str | None = None):
        """The :class:`torch.device` to run on for ``device`` (``None``: the setting)."""
        import torch

        name = device or self.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={name!r} was requested but CUDA is not available.")
        return dev

    def __repr__(self) -> str:
        return (
            f"ScxtrimoSettings(verbosity={logging.getLevelName(self._verbosity)!r}, "
            f"device={self.device!r}, progress_bar={self.progress_bar}, seed={self.seed})"
        )


settings = ScxtrimoSettings()
