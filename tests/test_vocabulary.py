import numpy as np
import pandas as pd
import pytest

from scxtrimo.data import load_vocabulary, map_genes


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary()


def test_vocabulary_is_the_scfoundation_one(vocab):
    assert vocab.n_genes == 19264
    assert vocab.symbols[0] == "A1BG"
    assert vocab.symbols[-1] == "ZZZ3"
    assert vocab.symbols.is_unique
    assert len(vocab.ensembl) > 18000


def test_symbols_map_in_vocabulary_order(pbmc, vocab):
    m = map_genes(pbmc.var)
    assert m.n_matched_columns == pbmc.n_vars
    assert np.array_equal(vocab.symbols[m.col_to_vocab], pbmc.var_names)
    assert m.matched_by["symbol"] == pbmc.n_vars


def test_ensembl_ids_match_the_same_genes(pbmc):
    by_symbol = map_genes(pbmc.var)
    var = pd.DataFrame(
        {"gene_ids": pbmc.var["gene_ids"].to_numpy()}, index=[f"g{i}" for i in range(pbmc.n_vars)]
    )
    by_id = map_genes(var, gene_ids_key="gene_ids", min_overlap=0.9)
    agree = by_id.col_to_vocab >= 0
    assert agree.mean() > 0.99
    assert np.array_equal(by_id.col_to_vocab[agree], by_symbol.col_to_vocab[agree])


def test_ensembl_version_suffix_is_ignored(vocab):
    gid = vocab.ensembl.index[0]
    var = pd.DataFrame({"ids": [gid + ".7", "ENSG99999999999"]}, index=["a", "b"])
    m = map_genes(var, gene_ids_key="ids", min_overlap=0.5)
    assert m.col_to_vocab[0] == vocab.ensembl.iloc[0]
    assert m.col_to_vocab[1] == -1


def test_ensembl_ids_in_var_names_are_matched_by_id(pbmc):
    var = pd.DataFrame({"symbol": pbmc.var_names.to_numpy()}, index=pbmc.var["gene_ids"].to_numpy())
    by_id = map_genes(var)  # no argument needed
    expected = map_genes(pbmc.var, gene_ids_key="gene_ids")
    np.testing.assert_array_equal(by_id.col_to_vocab, expected.col_to_vocab)
    assert by_id.matched_by["ensembl"] == by_id.n_matched_columns
    var.index = var.index + ".17"  # versioned IDs too
    np.testing.assert_array_equal(map_genes(var).col_to_vocab, expected.col_to_vocab)
    # Ensembl IDs where symbols were asked for: an error with a suggestion.
    var["ids"] = var.index
    with pytest.raises(ValueError, match="looks like Ensembl") as err:
        map_genes(var, gene_symbols_key="ids")
    assert "gene_symbols_key='symbol'" in str(err.value)


def test_case_insensitive_fallback_for_human_symbols():
    var = pd.DataFrame(index=["CD3E", "cd19", "MS4A1", "notagene"])
    m = map_genes(var, min_overlap=0.5)
    assert m.matched_by == {"ensembl": 0, "symbol": 2, "symbol_case_insensitive": 1}
    assert m.col_to_vocab[3] == -1


def test_mouse_symbols_are_refused_unless_accepted():
    var = pd.DataFrame(index=["Cd3e", "Cd19", "Ms4a1", "Actb", "Gapdh", "Lyz2"])
    with pytest.raises(ValueError, match="mouse"):
        map_genes(var)
    m = map_genes(var, case_insensitive=True)
    assert m.n_matched_columns >= 5


def test_duplicate_policy():
    var = pd.DataFrame(index=["CD3E", "cd3e", "MS4A1"])
    summed = map_genes(var, case_insensitive=True)
    assert summed.col_to_vocab[0] == summed.col_to_vocab[1] >= 0
    assert "CD3E" in summed.merged
    first = map_genes(var, case_insensitive=True, duplicates="first")
    assert first.col_to_vocab[1] == -1
    assert first.col_to_vocab[0] >= 0
    with pytest.raises(ValueError, match="more than one column"):
        map_genes(var, case_insensitive=True, duplicates="error")


def test_low_overlap_is_refused_with_examples():
    var = pd.DataFrame(index=[f"feature_{i}" for i in range(50)] + ["CD3E"])
    with pytest.raises(ValueError, match=r"Only 1 of 51 genes .* feature_0"):
        map_genes(var)


def test_missing_column_is_named(pbmc):
    with pytest.raises(KeyError, match=r"'symbols' is not a column.*gene_ids"):
        map_genes(pbmc.var, gene_symbols_key="symbols")


def test_overlap_summary(pbmc):
    s = map_genes(pbmc.var).summary(count_fraction=0.9)
    assert s["n_vocabulary_genes"] == 19264
    assert s["n_vocabulary_genes_present"] == pbmc.n_vars
    assert s["count_fraction"] == 0.9
