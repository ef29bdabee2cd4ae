"""Every public name (``__all__`` of scxtrimo and of its namespaces) is listed in docs/api.md."""

import importlib
import re
from pathlib import Path

import pytest

import scxtrimo

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
NAMESPACES = ("model", "module", "data", "tl", "pl", "datasets", "train", "inference", "metrics")

_MODULE = re.compile(r"\.\. (current)?module:: (\S+)\s*$")
_OBJECT = re.compile(
    r"\.\. (?:py:)?(?:auto)?(?:data|class|function|exception|attribute):: ([A-Za-z_][\w.]*)"
)
_ENTRY = re.compile(r"~?([A-Za-z_][\w.]*)")


def documented_names(text: str) -> set[str]:
    """Full names that an API page documents.

    Understands what docs/api.md uses: ``module`` / ``currentmodule``, the entries of
    ``autosummary`` directives, and ``data`` / ``autodata`` / ``class`` / ``function`` directives.
    A ``module`` directive documents the module itself.
    """
    found: set[str] = set()
    current = None
    in_autosummary = False

    def full(name: str) -> str:
        return name if name.startswith("scxtrimo.") or current is None else f"{current}.{name}"

    for line in text.splitlines():
        stripped = line.strip()
        if in_autosummary:
            if not stripped or stripped.startswith(":"):
                continue  # blank lines and options (:toctree: ...)
            if line.startswith(" ") and (entry := _ENTRY.fullmatch(stripped)):
                found.add(full(entry.group(1)))
                continue
            in_autosummary = False
        if match := _MODULE.fullmatch(stripped):
            current = match.group(2)
            if not match.group(1):
                found.add(current)
        elif stripped == ".. autosummary::":
            in_autosummary = True
        elif match := _OBJECT.match(stripped):
            found.add(full(match.group(1)))
    return found


def public_names(namespace: str) -> set[str]:
    module = importlib.import_module(namespace)
    return {f"{namespace}.{name}" for name in module.__all__}


@pytest.fixture(scope="module")
def documented() -> set[str]:
    return documented_names(API_MD.read_text(encoding="utf-8"))


def test_every_namespace_is_checked():
    # A namespace added to scxtrimo must be added here too, so that its names are checked.
    assert set(NAMESPACES) == set(scxtrimo._SUBMODULES)


@pytest.mark.parametrize("namespace", ["scxtrimo", *(f"scxtrimo.{n}" for n in NAMESPACES)])
def test_public_names_are_in_api_md(namespace, documented):
    missing = sorted(public_names(namespace) - documented)
    assert not missing, (
        f"public names of {namespace} (in __all__) missing from docs/api.md: {', '.join(missing)}"
    )


def test_parser_reports_missing_names():
    # The check above must be able to fail: a page that lists only some names.
    page = """
```{eval-rst}
.. module:: scxtrimo.tl
.. currentmodule:: scxtrimo.tl

.. autosummary::
   :toctree: generated/
   :nosignatures:

   embed
   ~annotate

Some text that names gene_modules without listing it.
```

```{eval-rst}
.. currentmodule:: scxtrimo.model

.. autosummary::
   :toctree: generated/

   _model.PreparedInput

.. currentmodule:: scxtrimo.module

.. data:: CONFIGS
   :type: dict
```
"""
    names = documented_names(page)
    assert names == {
        "scxtrimo.tl",
        "scxtrimo.tl.embed",
        "scxtrimo.tl.annotate",
        "scxtrimo.model._model.PreparedInput",
        "scxtrimo.module.CONFIGS",
    }
    assert "scxtrimo.model.PreparedInput" not in names  # a private path does not count
    assert "scxtrimo.tl.gene_modules" in public_names("scxtrimo.tl") - names
