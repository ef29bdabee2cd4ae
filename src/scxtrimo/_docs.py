"""Shared parameter documentation, filled into docstrings by :func:`doc_params` (scanpy's style)."""

from __future__ import annotations

from collections.abc import Callable
from textwrap import indent
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def doc_params(**texts: str) -> Callable[[F], F]:
    """Fill ``{name}`` placeholders of a docstring with the shared texts ``texts``.

    A placeholder stands alone on its line; every line of the text after the first gets the
    placeholder's indentation, so one text serves functions and methods alike.
    """

    def decorate(obj: F) -> F:
        doc = obj.__doc__
        if doc:
            lines = []
            for line in doc.split("\n"):
                stripped = line.strip()
                if stripped.startswith("{") and stripped.endswith("}") and stripped[1:-1] in texts:
                    pad = line[: len(line) - len(line.lstrip())]
                    lines.append(indent(texts[stripped[1:-1]].strip("\n"), pad))
                else:
                    lines.append(line)
            obj.__doc__ = "\n".join(lines)
        return obj

    return decorate


doc_input_settings = """\
layer
    Layer with the values; ``None`` uses the model's setting (``.X`` by default).
gene_symbols_key
    ``var`` column with gene symbols; ``None`` uses the model's setting (``var_names``).
gene_ids_key
    ``var`` column with Ensembl gene IDs (matched before symbols); ``None``: the model's.
input_type
    ``"counts"`` (raw counts), ``"log1p"`` (``log1p(x / total * 1e4)``) or ``"bulk"`` (bulk
    profiles, official bulk mode: scaled to the median library size, ``T = S``); ``None``:
    the model's (``"counts"`` by default).
total_counts_key
    ``obs`` column of per-cell total counts, the read depth S of ``"log1p"`` input;
    ``None``: the model's."""

DOCS = {"doc_input_settings": doc_input_settings}
