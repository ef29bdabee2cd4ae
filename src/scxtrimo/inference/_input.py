"""How a model reads an AnnData: the five input settings as one frozen value."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

InputType = Literal["counts", "log1p", "bulk"]


@dataclass(frozen=True)
class InputSettings:
    """How a model reads an AnnData: which matrix, which gene names, which kind of values.

    A model keeps the settings it was set up with (:meth:`~scxtrimo.model.XTrimoGene.setup_anndata`,
    :attr:`~scxtrimo.model.XTrimoGene.input_settings`); a tool or method call may change some of
    them for one AnnData with :meth:`merge`.

    Attributes
    ----------
    layer
        Layer with the values; ``None`` uses ``.X``.
    gene_symbols_key
        ``var`` column with gene symbols; ``None`` uses ``var_names``.
    gene_ids_key
        ``var`` column with Ensembl gene IDs (matched first).
    input_type
        ``"counts"`` (raw counts), ``"log1p"`` (``log1p(x / total * 1e4)``) or ``"bulk"``
        (bulk samples, scaled to the median library size).
    total_counts_key
        ``obs`` column of per-cell total counts (the read depth S of ``"log1p"`` input).
    """

    layer: str | None = None
    gene_symbols_key: str | None = None
    gene_ids_key: str | None = None
    input_type: InputType = "counts"
    total_counts_key: str | None = None

    #: The names of the settings, in order.
    FIELDS: ClassVar[tuple[str, ...]] = (
        "layer",
        "gene_symbols_key",
        "gene_ids_key",
        "input_type",
        "total_counts_key",
    )

    def __post_init__(self) -> None:
        if self.input_type not in ("counts", "log1p", "bulk"):
            raise ValueError(
                f"input_type must be 'counts', 'log1p' or 'bulk', not {self.input_type!r}."
            )

    def merge(self, **overrides: Any) -> InputSettings:
        """These settings with ``overrides`` applied; an override of ``None`` keeps the value.

        Raises
        ------
        TypeError
            If an override is not one of ``FIELDS``.
        """
        unknown = set(overrides) - set(self.FIELDS)
        if unknown:
            raise TypeError(
                f"Unexpected arguments: {sorted(unknown)}; the input settings are "
                f"{list(self.FIELDS)}."
            )
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> InputSettings:
        """Settings from a mapping (such as a registry's ``setup_args``); other keys are ignored."""
        mapping = mapping or {}
        return cls().merge(**{k: mapping[k] for k in cls.FIELDS if k in mapping})

    def to_dict(self) -> dict[str, Any]:
        """The settings by name."""
        return {k: getattr(self, k) for k in self.FIELDS}
