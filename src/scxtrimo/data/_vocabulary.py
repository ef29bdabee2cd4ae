"""The scFoundation 19,264-gene vocabulary and the mapping of an AnnData's genes onto it.

The model's input axis is fixed: 19,264 human genes in the order of
``OS_scRNA_gene_index.19264.tsv`` (Apache-2.0, from the scFoundation repository). A dataset is
never densified or reordered to that axis; instead each of its columns gets a vocabulary index
(``-1`` when the gene is not in the vocabulary) and the sparse kernels apply that map per batch.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from typing import Literal

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

VOCABULARY_FILE = "OS_scRNA_gene_index.19264.tsv"
ENSEMBL_FILE = "vocabulary_ensembl.tsv"
N_VOCABULARY_GENES = 19264

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_ENSEMBL_VERSION_RE = re.compile(r"\.\d+$")
# Candidate var columns that usually hold symbols or Ensembl IDs, used only to suggest a fix.
_SYMBOL_COLUMN_HINTS = (
    "gene_symbols",
    "gene_symbol",
    "feature_name",
    "symbol",
    "gene_name",
    "gene",
)
_ID_COLUMN_HINTS = ("gene_ids", "gene_id", "ensembl_id", "ensembl", "feature_id")

DuplicatePolicy = Literal["sum", "first", "error"]


class LowVocabularyCoverageWarning(UserWarning):
    """The data cover less than half of the model vocabulary (e.g. a highly-variable-gene subset).

    Filter it like any warning: ``warnings.filterwarnings("ignore", category=...)``.
    """


class DuplicateGenesWarning(UserWarning):
    """Several columns of the data have the same gene name; the warning says how they are used."""


@dataclass(frozen=True)
class GeneVocabulary:
    """The ordered gene vocabulary of a model.

    Parameters
    ----------
    symbols
        Gene symbols in model order; position ``i`` is the model's gene index ``i``.
    ensembl
        Ensembl gene IDs (without version) mapped to a vocabulary index.
    """

    symbols: pd.Index
    ensembl: pd.Series = field(repr=False)

    @property
    def n_genes(self) -> int:
        """Number of genes in the vocabulary."""
        return len(self.symbols)

    def __len__(self) -> int:
        return self.n_genes


@lru_cache(maxsize=1)
def load_vocabulary() -> GeneVocabulary:
    """Load the scFoundation 19,264-gene vocabulary shipped with scxtrimo.

    Returns
    -------
    The vocabulary, with an Ensembl-ID table covering about 18,000 of its genes (derived from
    the 10x Genomics GRCh38 gene table and GENCODE v44; see ``NOTICE``).
    """
    resources = files("scxtrimo") / "_resources"
    with (resources / VOCABULARY_FILE).open("r") as fh:
        table = pd.read_csv(fh, sep="\t")
    if list(table.columns) != ["gene_name", "index"] or not np.array_equal(
        table["index"].to_numpy(), np.arange(len(table))
    ):
        raise RuntimeError(f"The packaged vocabulary {VOCABULARY_FILE} is corrupt.")
    symbols = pd.Index(table["gene_name"].astype(str), name="gene_name")
    with (resources / ENSEMBL_FILE).open("r") as fh:
        ids = pd.read_csv(fh, sep="\t")
    position = pd.Series(np.arange(len(symbols)), index=symbols)
    ensembl = pd.Series(
        position.loc[ids["gene_name"]].to_numpy(), index=pd.Index(ids["ensembl_id"]), name="index"
    )
    return GeneVocabulary(symbols=symbols, ensembl=ensembl)


@dataclass(frozen=True)
class GeneMapping:
    """How the columns of a dataset map onto the model vocabulary.

    Attributes
    ----------
    col_to_vocab
        ``int64`` array, one entry per dataset column: its vocabulary index or ``-1``.
    n_vars
        Number of dataset columns.
    n_vocab
        Size of the vocabulary.
    matched_by
        Number of columns matched by each rule (``"ensembl"``, ``"symbol"``,
        ``"symbol_case_insensitive"``).
    merged
        Vocabulary genes that several columns map to, with those columns' names; their counts
        are summed (``duplicates="sum"``) or only the first column is used (``"first"``).
    unmatched_examples
        A few column names that matched nothing, for the report.
    """

    col_to_vocab: np.ndarray
    n_vars: int
    n_vocab: int
    matched_by: dict[str, int]
    merged: dict[str, list[str]]
    unmatched_examples: list[str]
    gene_symbols_key: str | None = None
    gene_ids_key: str | None = None

    @property
    def n_matched_columns(self) -> int:
        """Number of dataset columns that map to a vocabulary gene."""
        return int((self.col_to_vocab >= 0).sum())

    @property
    def n_vocab_genes(self) -> int:
        """Number of distinct vocabulary genes present in the dataset."""
        return int(np.unique(self.col_to_vocab[self.col_to_vocab >= 0]).size)

    @property
    def column_fraction(self) -> float:
        """Share of the dataset's columns that map to the vocabulary."""
        return self.n_matched_columns / max(self.n_vars, 1)

    @property
    def vocab_fraction(self) -> float:
        """Share of the vocabulary that the dataset covers."""
        return self.n_vocab_genes / self.n_vocab

    def vocab_genes_mask(self) -> np.ndarray:
        """Boolean mask over the vocabulary: which genes the dataset has."""
        mask = np.zeros(self.n_vocab, dtype=bool)
        mask[self.col_to_vocab[self.col_to_vocab >= 0]] = True
        return mask

    def summary(self, count_fraction: float | None = None) -> dict:
        """A JSON-friendly report, as written to ``adata.uns["scxtrimo"]["gene_overlap"]``."""
        out = {
            "n_vars": self.n_vars,
            "n_matched_columns": self.n_matched_columns,
            "n_vocabulary_genes_present": self.n_vocab_genes,
            "n_vocabulary_genes": self.n_vocab,
            "column_fraction": round(self.column_fraction, 6),
            "vocabulary_fraction": round(self.vocab_fraction, 6),
            "matched_by": dict(self.matched_by),
            "n_merged_genes": len(self.merged),
            "gene_symbols_key": self.gene_symbols_key,
            "gene_ids_key": self.gene_ids_key,
        }
        if count_fraction is not None:
            out["count_fraction"] = round(float(count_fraction), 6)
        return out


def looks_like_ensembl(names: pd.Index | np.ndarray, min_fraction: float = 0.5) -> bool:
    """Whether most of ``names`` are Ensembl gene IDs (``ENSG…``, ``ENSMUSG…``)."""
    names = pd.Index(names).astype(str)
    if len(names) == 0:
        return False
    return float(names.str.match(_ENSEMBL_RE).mean()) >= min_fraction


def _title_case_fraction(names: pd.Index) -> float:
    """Share of alphabetic symbols written like mouse genes (``Cd3e``: upper then lower case)."""
    names = names[names.str.contains("[A-Za-z]", regex=True)]
    if len(names) == 0:
        return 0.0
    return float(names.str.match(r"^[A-Z][a-z0-9]+[a-z][a-z0-9-]*$").mean())


def _suggest_columns(var: pd.DataFrame, vocab: GeneVocabulary) -> str:
    """Describe var columns that would map better, to put in an error message."""
    hints = []
    for col in var.columns:
        values = var[col]
        textual = pd.api.types.is_object_dtype(values) or pd.api.types.is_string_dtype(values)
        if not textual and not isinstance(values.dtype, pd.CategoricalDtype):
            continue
        values = pd.Index(values.astype(str))
        if looks_like_ensembl(values):
            n = int(
                values.str.replace(_ENSEMBL_VERSION_RE, "", regex=True)
                .isin(vocab.ensembl.index)
                .sum()
            )
            hints.append(f"gene_ids_key={col!r} ({n:,} Ensembl IDs in the vocabulary)")
        else:
            n = int(values.isin(vocab.symbols).sum())
            if n > 0:
                hints.append(f"gene_symbols_key={col!r} ({n:,} symbols in the vocabulary)")
    if not hints:
        known = [c for c in (*_SYMBOL_COLUMN_HINTS, *_ID_COLUMN_HINTS)]
        return (
            "No var column looks like gene symbols or Ensembl IDs either "
            f"(common names are {', '.join(known[:6])})."
        )
    return "Candidate columns: " + "; ".join(hints) + "."


def map_genes(
    var: pd.DataFrame,
    *,
    gene_symbols_key: str | None = None,
    gene_ids_key: str | None = None,
    case_insensitive: bool | None = None,
    duplicates: DuplicatePolicy = "sum",
    min_overlap: float = 0.5,
    vocabulary: GeneVocabulary | None = None,
) -> GeneMapping:
    """Map the genes of a dataset onto the model vocabulary.

    Rules, in order of precedence (a vocabulary gene is claimed by the first rule that finds
    it): Ensembl ID from ``var[gene_ids_key]`` (version suffixes such as ``.12`` are ignored),
    exact symbol from ``var_names`` or ``var[gene_symbols_key]``, then case-insensitive symbol.

    When the ``var_names`` themselves are Ensembl IDs (as in CELLxGENE files and the Census,
    e.g. ``ENSG00000141510`` or versioned ``ENSG00000141510.17``) and neither key is given,
    they are matched by ID (version suffixes ignored) with no extra argument. Columns with the
    same name (duplicated ``var_names``) map to the same gene: a
    :class:`DuplicateGenesWarning` says so, and ``duplicates`` says how they are combined.

    Parameters
    ----------
    var
        The dataset's ``.var`` (its index are the ``var_names``).
    gene_symbols_key
        Column of ``var`` holding gene symbols; ``None`` uses ``var_names``.
    gene_ids_key
        Column of ``var`` holding Ensembl gene IDs, matched before symbols.
    case_insensitive
        Whether symbols may match ignoring case. ``None`` (default) allows it for human-like
        symbols and refuses datasets whose symbols look like mouse genes (``Cd3e``), which
        would otherwise map silently onto human genes of the same name.
    duplicates
        What to do when several columns map to the same vocabulary gene: ``"sum"`` their counts
        (default; e.g. two Ensembl IDs of one symbol), keep the ``"first"``, or raise an ``"error"``.
    min_overlap
        Minimum share of the dataset's columns that must map to the vocabulary; below it the
        gene identifiers are almost certainly of the wrong kind and a :class:`ValueError` is
        raised before any work starts.
    vocabulary
        The vocabulary; the packaged scFoundation vocabulary by default.

    Returns
    -------
    The column-to-vocabulary map and its report.
    """
    vocab = vocabulary or load_vocabulary()
    if duplicates not in ("sum", "first", "error"):
        raise ValueError(f"duplicates must be 'sum', 'first' or 'error', not {duplicates!r}.")
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}.")
    for key, what in ((gene_symbols_key, "gene_symbols_key"), (gene_ids_key, "gene_ids_key")):
        if key is not None and key not in var.columns:
            raise KeyError(
                f"{what}={key!r} is not a column of adata.var. Available columns: "
                f"{list(var.columns) or 'none'}."
            )
    n_vars = var.shape[0]
    symbols = pd.Index(
        var[gene_symbols_key].astype(str) if gene_symbols_key else var.index.astype(str)
    )
    col_to_vocab = np.full(n_vars, -1, dtype=np.int64)
    claimed_by_rule = np.zeros(n_vars, dtype=np.int8)  # 0 none, 1 ensembl, 2 exact, 3 case

    ids_from_var_names = False
    if gene_ids_key is None and looks_like_ensembl(symbols):
        if gene_symbols_key is not None:
            raise ValueError(
                f"var[{gene_symbols_key!r}] looks like Ensembl gene IDs (e.g. "
                f"{', '.join(symbols[:3])}), but gene symbols were expected. Pass "
                f"gene_ids_key={gene_symbols_key!r} to match them by ID, or "
                f"gene_symbols_key=<a var column with symbols>. {_suggest_columns(var, vocab)}"
            )
        # Ensembl IDs as var_names (CELLxGENE, Census, Cell Ranger features): match by ID,
        # version suffixes (ENSG00000141510.17) ignored.
        ids_from_var_names = True
        logger.info(
            "var_names look like Ensembl gene IDs (e.g. %s): matching them by ID, version "
            "suffixes ignored.",
            ", ".join(symbols[:2]),
        )

    if gene_ids_key is not None or ids_from_var_names:
        raw = var.index if ids_from_var_names else var[gene_ids_key]
        ids = pd.Index(raw.astype(str)).str.replace(_ENSEMBL_VERSION_RE, "", regex=True)
        hit = vocab.ensembl.reindex(ids).to_numpy()
        found = ~np.isnan(hit)
        col_to_vocab[found] = hit[found].astype(np.int64)
        claimed_by_rule[found] = 1

    if ids_from_var_names:
        symbols = pd.Index(np.full(n_vars, "", dtype=object)).astype(str)  # no symbol rules
    exact = pd.Series(np.arange(vocab.n_genes), index=vocab.symbols)
    todo = col_to_vocab < 0
    hit = exact.reindex(symbols[todo]).to_numpy()
    found = ~np.isnan(hit)
    idx = np.flatnonzero(todo)[found]
    col_to_vocab[idx] = hit[found].astype(np.int64)
    claimed_by_rule[idx] = 2

    todo = col_to_vocab < 0
    upper_vocab = pd.Series(np.arange(vocab.n_genes), index=vocab.symbols.str.upper())
    hit = upper_vocab.reindex(symbols[todo].str.upper()).to_numpy()
    found = ~np.isnan(hit)
    n_case = int(found.sum())
    if n_case:
        mouse_like = _title_case_fraction(symbols) > 0.5
        if case_insensitive is None and mouse_like:
            raise ValueError(
                f"The gene symbols look like mouse genes ({_title_case_fraction(symbols):.0%} "
                f"are written like {', '.join(symbols[todo][found][:3])}); scFoundation is a "
                f"human model and {n_case:,} of them would only match human genes by ignoring "
                "case. Map mouse genes to human orthologs first, or pass "
                "case_insensitive=True to accept matching by name."
            )
        if case_insensitive is not False:
            idx = np.flatnonzero(todo)[found]
            col_to_vocab[idx] = hit[found].astype(np.int64)
            claimed_by_rule[idx] = 3

    # Several columns on one vocabulary gene: report, then apply the policy.
    mapped = np.flatnonzero(col_to_vocab >= 0)
    order = np.lexsort((mapped, claimed_by_rule[mapped], col_to_vocab[mapped]))
    mapped = mapped[order]
    genes = col_to_vocab[mapped]
    is_repeat = np.r_[False, genes[1:] == genes[:-1]]
    merged: dict[str, list[str]] = {}
    if is_repeat.any():
        dup_genes = np.unique(genes[is_repeat])
        names = var.index.astype(str)
        for g in dup_genes[:1000]:
            merged[str(vocab.symbols[g])] = list(names[mapped[genes == g]])
        if duplicates == "error":
            examples = "; ".join(f"{k}: {v}" for k, v in list(merged.items())[:5])
            raise ValueError(
                f"{len(dup_genes):,} vocabulary genes are matched by more than one column "
                f"(e.g. {examples}). Remove the duplicates, or pass duplicates='sum' to add their "
                "counts or duplicates='first' to keep the first column."
            )
        if duplicates == "first":
            col_to_vocab[mapped[is_repeat]] = -1
        was_mapped = np.zeros(n_vars, dtype=bool)
        was_mapped[mapped] = True
        repeated = names[names.duplicated(keep=False) & was_mapped]
        if len(repeated) and duplicates != "error":
            how = (
                "their counts are summed into that gene (duplicates='sum')"
                if duplicates == "sum"
                else "only the first column is used (duplicates='first')"
            )
            warnings.warn(
                f"{repeated.nunique():,} var_names occur more than once (e.g. "
                f"{', '.join(pd.unique(repeated)[:3])}); each maps to one vocabulary gene and "
                f"{how}. Pass duplicates='first' to keep the first column, 'error' to refuse, or "
                "make the names unique (adata.var_names_make_unique()) to use only the first "
                "under its name.",
                DuplicateGenesWarning,
                stacklevel=2,
            )

    matched_by = {
        "ensembl": int((claimed_by_rule == 1).sum()),
        "symbol": int((claimed_by_rule == 2).sum()),
        "symbol_case_insensitive": int((claimed_by_rule == 3).sum()),
    }
    unmatched = list(var.index.astype(str)[col_to_vocab < 0][:5])
    mapping = GeneMapping(
        col_to_vocab=col_to_vocab,
        n_vars=n_vars,
        n_vocab=vocab.n_genes,
        matched_by=matched_by,
        merged=merged,
        unmatched_examples=unmatched,
        gene_symbols_key=gene_symbols_key,
        gene_ids_key=gene_ids_key,
    )
    if n_vars == 0:
        raise ValueError("The AnnData has no genes (n_vars == 0); there is nothing to map.")
    if mapping.column_fraction < min_overlap:
        raise ValueError(
            f"Only {mapping.n_matched_columns:,} of {n_vars:,} genes "
            f"({mapping.column_fraction:.1%}) match the {vocab.n_genes:,}-gene scFoundation "
            f"vocabulary (minimum min_overlap={min_overlap:.0%}). Unmatched examples: "
            f"{', '.join(unmatched)}. Check the gene identifiers: "
            f"{_suggest_columns(var, vocab)}"
        )
    return mapping


def log_overlap(
    mapping: GeneMapping, count_fraction: float | None = None, *, stacklevel: int = 3
) -> None:
    """Log the overlap report and warn when the dataset covers little of the vocabulary.

    ``stacklevel`` of the warning: 3 points past the function that called this one.
    """
    share = "" if count_fraction is None else f", {count_fraction:.1%} of counts"
    logger.info(
        "%d of %d genes map to %d of %d vocabulary genes%s.",
        mapping.n_matched_columns,
        mapping.n_vars,
        mapping.n_vocab_genes,
        mapping.n_vocab,
        share,
    )
    if mapping.vocab_fraction < 0.5:
        warnings.warn(
            f"The data cover only {mapping.n_vocab_genes:,} of the {mapping.n_vocab:,} "
            f"vocabulary genes ({mapping.vocab_fraction:.1%}): the model expects the whole "
            "transcriptome, and a gene subset (e.g. highly variable genes) gives weaker "
            "embeddings. Use the unfiltered counts (e.g. adata.raw) if you have them.",
            LowVocabularyCoverageWarning,
            stacklevel=stacklevel,
        )
