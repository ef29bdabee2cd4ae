"""Sphinx configuration of the scxtrimo documentation.

Build (from the repository root, after ``pip install -e ".[doc]"``)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

Environment variables:

``SCXTRIMO_DOCS_INTERSPHINX=1|0``
    Link types and functions to the documentation of Python, NumPy, AnnData, scanpy, PyTorch,
    scvi-tools... (needs the internet; on by default on Read the Docs, off elsewhere so that an
    offline build neither waits nor warns; ``0`` turns it off on Read the Docs too).
``SCXTRIMO_DOCS_EXECUTE=off|cache|force``
    How the tutorials are executed (default ``cache``: run once, then re-run only notebooks
    whose code changed; ``force`` runs every tutorial, as CI does; ``off`` renders them without
    outputs, for quick edits of the prose).

Every cross-reference must resolve (``nitpicky``): there is no list of ignored scxtrimo
references. Only references to third-party objects are rendered as plain text when
intersphinx is off (``nitpick_ignore_regex`` below).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from datetime import date
from importlib.metadata import version as _version
from pathlib import Path

# sphinx-autodoc-typehints 3.6 uses an API that Sphinx 9 deprecates; not our concern here.
warnings.filterwarnings("ignore", message=".*set_application.*is deprecated")

HERE = Path(__file__).parent
ROOT = HERE.parent

# -- tutorials: ../tutorials/*.md are the sources; they are mirrored into docs/tutorials ----------
# Sphinx only reads files below its source folder. The tutorials live at the top of the
# repository (where users look for them), so they are copied here before the build; a copy is
# only rewritten when its source changed, which keeps incremental builds and the execution cache
# valid. The copies are ignored by git (docs/.gitignore).
_TUTORIALS_SRC = ROOT / "tutorials"
_TUTORIALS_DST = HERE / "tutorials"


def _sync_tutorials() -> None:
    _TUTORIALS_DST.mkdir(exist_ok=True)
    wanted = {p.name for p in _TUTORIALS_SRC.glob("*.md")}
    for src in sorted(_TUTORIALS_SRC.glob("*.md")):
        dst = _TUTORIALS_DST / src.name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
    for stale in _TUTORIALS_DST.glob("*.md"):
        if stale.name not in wanted:
            stale.unlink()


_sync_tutorials()


# -- command-line help, generated from the installed parser (docs/generated/cli.txt) ----------
def _write_cli_help() -> None:
    os.environ.setdefault("COLUMNS", "96")  # argparse wraps to the terminal width
    from scxtrimo._cli import build_parser

    parser = build_parser()
    parts = [parser.format_help()]
    for action in parser._subparsers._group_actions:  # the sub-commands, in order
        for name, sub in action.choices.items():
            parts.append(f"$ scxtrimo {name} --help\n{sub.format_help()}")
    text = "$ scxtrimo --help\n" + "\n".join(parts)
    out = HERE / "generated" / "cli.txt"
    out.parent.mkdir(exist_ok=True)
    if not out.exists() or out.read_text() != text:
        out.write_text(text)


_write_cli_help()


# -- table of the named model configurations (docs/generated/configs.rst) ----------------------
def _write_config_table() -> None:
    from scxtrimo.module import CONFIGS

    header = ("name", "encoder (width / layers / heads / ff)", "decoder", "parameters")
    rows = [
        (
            f"``{name}``",
            f"{c.encoder_dim} / {c.encoder_depth} / {c.encoder_heads} / {c.encoder_ff_dim}",
            f"{c.decoder_dim} / {c.decoder_depth} / {c.decoder_heads} x {c.decoder_dim_head}"
            f" / {c.decoder_ff_dim}",
            f"{c.n_parameters():,}",
        )
        for name, c in CONFIGS.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = " ".join("=" * w for w in widths)
    lines = [rule, " ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), rule]
    lines += [" ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines += [rule, ""]
    out = HERE / "generated" / "configs.rst"
    text = "\n".join(lines)
    if not out.exists() or out.read_text() != text:
        out.write_text(text)


_write_config_table()

# -- project ----------------------------------------------------------------------------------
project = "scxtrimo"
author = "scxtrimo developers"
copyright = f"{date.today():%Y}, {author}"
release = _version("scxtrimo")
version = ".".join(release.split(".")[:2])
repository_url = "https://github.com/scxtrimo/scxtrimo"

# -- extensions -------------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",  # after napoleon: types come from the annotations
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinxcontrib.bibtex",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
nitpicky = True  # every cross-reference must resolve (see nitpick_ignore_regex below)

# -- autodoc / autosummary / napoleon / typehints ---------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False  # no scvi-tools / torch docstrings pasted into ours
autodoc_class_signature = "mixed"
autodoc_default_options = {"show-inheritance": False}


def _model_methods() -> list[str]:
    """Public methods of XTrimoGene written in scxtrimo: its own and its mixins' (model_class.rst)."""
    from scxtrimo.model import XTrimoGene

    return sorted(
        name
        for klass in XTrimoGene.__mro__
        if klass.__module__.startswith("scxtrimo.")
        for name, value in vars(klass).items()
        if not name.startswith("_") and not isinstance(value, property)
    )


autosummary_context = {"model_methods": _model_methods()}

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_use_ivar = True
napoleon_custom_sections = [("Params", "Parameters")]

typehints_defaults = "braces"
typehints_document_rtype = True
always_document_param_types = False
typehints_use_signature = False
typehints_use_signature_return = False

# -- MyST / myst-nb ---------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "amsmath", "substitution"]
myst_heading_anchors = 3
myst_substitutions = {"version": release}

nb_execution_mode = os.environ.get("SCXTRIMO_DOCS_EXECUTE", "cache")
# The tutorials' kernels inherit this environment, and ipykernel only selects its inline
# backend when MPLBACKEND is unset: with MPLBACKEND=Agg (as CI sets for the tests) every figure
# would silently be missing from the pages.
os.environ.pop("MPLBACKEND", None)
nb_execution_timeout = 1200  # per cell; CPU-only CI on two shared cores
nb_execution_raise_on_error = True  # a failing tutorial fails the build
nb_execution_show_tb = True
nb_merge_streams = True
nb_execution_cache_path = str(HERE / "_build" / ".jupyter_cache")

# -- bibliography -----------------------------------------------------------------------------
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"
bibtex_default_style = "plain"

# -- intersphinx: opt-in, it needs the internet -------------------------------------------------
_INTERSPHINX = os.environ.get(
    "SCXTRIMO_DOCS_INTERSPHINX", "1" if os.environ.get("READTHEDOCS") == "True" else "0"
).lower() in {"1", "true", "yes"}
intersphinx_mapping = (
    {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "scipy": ("https://docs.scipy.org/doc/scipy/", None),
        "pandas": ("https://pandas.pydata.org/docs/", None),
        "matplotlib": ("https://matplotlib.org/stable/", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "mudata": ("https://mudata.readthedocs.io/en/latest/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "torch": ("https://docs.pytorch.org/docs/stable/", None),
        "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
        "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
    }
    if _INTERSPHINX
    else {}
)
intersphinx_timeout = 15
intersphinx_disabled_reftypes = ["std:doc"]

# References to third-party objects resolve through intersphinx when it is on. When it is off
# (offline builds) or an inventory lacks an entry, they are rendered as plain text instead of
# failing the nitpicky build. Only third-party names are listed here: every reference to a
# scxtrimo object must resolve.
_THIRD_PARTY = (
    r"(anndata|ad|AnnData|mudata|md|MuData|numpy|np|pandas|pd|scipy|sp|sparse|torch|nn|"
    r"lightning|pl|pytorch_lightning|scvi|sklearn|scanpy|sc|matplotlib|plt|Axes|Figure|"
    r"collections|typing|os|pathlib|logging|concurrent|dataclasses|numba|h5py|tqdm)"
)
nitpick_ignore_regex = [
    (r"py:(class|obj|func|meth|attr|mod|data|exc)", _THIRD_PARTY + r"(\..*)?"),
    # Module-level type aliases rendered by sphinx-autodoc-typehints as their bare names.
    (r"py:(class|obj|data)", r"(Literal|Any|Sequence|Mapping|Iterator|PathLike|Path)(\[.*\])?"),
    # The ``...`` of ``Callable[..., Any]`` (the recipes' ``fit``), rendered as Ellipsis.
    (r"py:data", r"Ellipsis"),
]

# -- HTML -------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"scxtrimo {release}"
html_static_path: list[str] = []
html_theme_options = {
    "repository_url": repository_url,
    "repository_branch": "main",
    "path_to_docs": "docs",
    "use_repository_button": True,
    "use_issues_button": True,
    "use_download_button": True,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_context = {
    "github_user": "scxtrimo",
    "github_repo": "scxtrimo",
    "github_version": "main",
    "doc_path": "docs",
}
html_show_sourcelink = True
pygments_style = "default"


# -- napoleon adjustments for scanpy-style docstrings -------------------------------------------------------------
# scanpy-style docstrings describe what a function returns in prose ("The axes.", or a
# definition list of the keys it sets), and leave the type to the annotation. Napoleon's
# numpydoc parser would read each line of such a section as "name : type" and turn prose into
# broken type references, so the section is kept as written, inside a ``:returns:`` field;
# sphinx-autodoc-typehints then adds the return type from the annotation next to it. (The
# ":" line that sphinx-autodoc-typehints puts under the header for napoleon is dropped.)
def _parse_returns_section(self, section: str) -> list[str]:
    lines = self._dedent(self._strip_empty(self._consume_to_next_section()))
    if lines and lines[0].strip() == ":":  # marker added by sphinx-autodoc-typehints
        lines = self._dedent(self._strip_empty(lines[1:]))
    if not lines:
        return []
    return [":returns:", *(f"   {line}" if line else "" for line in lines), ""]


# Napoleon reads the first line of a property's docstring as "type: description" when it has
# a colon ("Number of decoder positions: every gene plus ..."). Types come from annotations
# here, so property and attribute docstrings are kept as written.
def _consume_inline_attribute(self) -> tuple[str, list[str]]:
    lines = [self._lines.next(), *self._dedent(self._consume_to_end())]
    return "", self.__class__(lines, self._config).lines()


from sphinx.ext.napoleon.docstring import NumpyDocstring  # noqa: E402

NumpyDocstring._parse_returns_section = _parse_returns_section
NumpyDocstring._consume_inline_attribute = _consume_inline_attribute


# -- set-up hook ------------------------------------------------------------------------------
class _InventoryUnreachable(logging.Filter):
    """Turn "failed to reach any of the inventories" into an info message.

    Intersphinx only adds links; a documentation site must not fail because a third-party
    server was slow. (Sphinx gives this warning no type, so ``suppress_warnings`` cannot.)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and "failed to reach any of the inventories" in str(
            record.msg
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_NAMESPACES = ("data", "datasets", "model", "module", "pl", "tl", "train")


def _resolve_private_path(app, env, node, contnode):
    """Resolve ``scxtrimo.<namespace>._<module>.<name>`` to the public ``scxtrimo.<namespace>.<name>``.

    A docstring may name a public object by the private module that defines it. Sphinx already
    accepts that for classes (autodoc records their defining module as a ``:canonical:`` name)
    but not for functions. Only objects that the namespace exports (``__all__``) are resolved:
    a reference to an object that is not public still fails the build.
    """
    import importlib

    if node.get("refdomain") != "py":
        return None
    parts = node.get("reftarget", "").split(".")
    if len(parts) < 4 or parts[0] != "scxtrimo" or not parts[2].startswith("_"):
        return None
    namespace = f"scxtrimo.{parts[1]}"
    try:
        public = importlib.import_module(namespace)
        private = importlib.import_module(f"{namespace}.{parts[2]}")
    except ImportError:
        return None
    name = parts[3]
    if name not in getattr(public, "__all__", ()) or getattr(private, name, None) is not getattr(
        public, name
    ):
        return None
    target = ".".join([namespace, name, *parts[4:]])
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], target, node, contnode
    )


def _check_api_is_complete(app) -> None:
    """Warn (an error under ``-W``) when a public object is missing from ``api.md``."""
    import importlib
    import re

    from sphinx.util import logging as sphinx_logging

    listed, current = set(), None
    for line in (HERE / "api.md").read_text().splitlines():
        if match := re.match(r"\.\. (?:current)?module:: (\S+)", line.strip()):
            current = match.group(1)
        elif current and re.fullmatch(r"   [A-Za-z_][\w.]*", line):
            listed.add(f"{current}.{line.strip()}")
        elif current and (match := re.match(r"\.\. (?:auto)?data:: (\w+)", line.strip())):
            listed.add(f"{current}.{match.group(1)}")
    log = sphinx_logging.getLogger("scxtrimo-docs")
    for name in _NAMESPACES:
        namespace = importlib.import_module(f"scxtrimo.{name}")
        for obj in getattr(namespace, "__all__", ()):
            if f"scxtrimo.{name}.{obj}" not in listed:
                log.warning(
                    "scxtrimo.%s.%s is public (in __all__) but not listed in docs/api.md", name, obj
                )


# Pages written alongside other work (benchmark results, evaluations): listed in the index's
# table of contents only once they exist, so that the build never points at a missing page.
_OPTIONAL_PAGES = ("performance", "evaluation")


def _drop_missing_optional_pages(app, docname: str, source: list[str]) -> None:
    if docname != "index":
        return
    for page in _OPTIONAL_PAGES:
        if not (HERE / f"{page}.md").exists():
            source[0] = source[0].replace(f"\n{page}\n", "\n")


def _public_bases(app, name: str, obj: object, options: dict, bases: list) -> None:
    """Show a class's bases without scxtrimo's mixins (the model's methods are its own)."""
    bases[:] = [
        b
        for b in bases
        if not (
            getattr(b, "__module__", "").startswith("scxtrimo.") and b.__name__.endswith("Mixin")
        )
    ]


def setup(app) -> None:
    logging.getLogger("sphinx.sphinx.ext.intersphinx._load").addFilter(_InventoryUnreachable())
    app.connect("builder-inited", _check_api_is_complete)
    app.connect("missing-reference", _resolve_private_path)
    app.connect("source-read", _drop_missing_optional_pages)
    app.connect("autodoc-process-bases", _public_bases)
