"""Gene modules: do known marker genes of one cell type fall into the same module?

Usage (from the repository root)::

    python benchmarks/evaluation/evaluate_gene_modules.py --model runs/small_pbmc --out benchmarks/results

On pbmc4k, the 2,000 genes most variable across cells (variance of the log-normalised values)
plus 17 marker genes of four cell types (T: CD3D CD3E CD2 IL7R; B: MS4A1 CD79A CD79B CD19;
monocyte: CD14 LYZ S100A8 S100A9 FCN1; NK: NKG7 GNLY KLRD1) are clustered into modules by
``scxtrimo.tl.gene_modules``, with the model's context embeddings (decoder states averaged
over 300 cells) and with its context-free gene-embedding table, by Leiden (resolution 1) and
by hierarchical clustering into 20 modules. Baselines cluster the same genes the same way on
(a) their expression profiles across all cells (standardised log-normalised values; cosine =
Pearson correlation, i.e. classic co-expression modules) and (b) the table of an untrained
model (random embeddings: the chance level).

Scores: the share of within-set marker pairs that share a module (higher is better), its
expectation for random gene pairs given the module sizes, the share of between-set marker
pairs that share a module (lower is better), and a permutation p-value (random gene sets of
the same sizes, 2,000 draws).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import pandas as pd

import scxtrimo
from _evaluation import command_line, load_model, log, machine, quiet, run_record, write_results
from scxtrimo.metrics import log_normalized
from scxtrimo.model import XTrimoGene

MARKERS = {
    "T cell": ["CD3D", "CD3E", "CD2", "IL7R"],
    "B cell": ["MS4A1", "CD79A", "CD79B", "CD19"],
    "monocyte": ["CD14", "LYZ", "S100A8", "S100A9", "FCN1"],
    "NK cell": ["NKG7", "GNLY", "KLRD1"],
}


def pair_scores(modules: pd.Series, n_permutations: int, seed: int) -> dict:
    """Co-clustering of marker pairs, chance expectation and a permutation p-value."""
    sets = {k: [g for g in v if g in modules.index] for k, v in MARKERS.items()}
    within = [p for genes in sets.values() for p in itertools.combinations(genes, 2)]
    between = [
        (a, b)
        for (s1, g1), (s2, g2) in itertools.combinations(sets.items(), 2)
        for a in g1
        for b in g2
    ]
    same = lambda pairs, m: float(np.mean([m[a] == m[b] for a, b in pairs]))  # noqa: E731
    sizes = modules.value_counts().to_numpy()
    n = len(modules)
    expected = float((sizes * (sizes - 1)).sum() / (n * (n - 1)))
    observed = same(within, modules)
    rng = np.random.default_rng(seed)
    values = modules.to_numpy()
    null = []
    for _ in range(n_permutations):
        draw = rng.permutation(n)
        shares, start = [], 0
        for genes in sets.values():
            picked = values[draw[start : start + len(genes)]]
            start += len(genes)
            shares.extend(
                picked[i] == picked[j] for i, j in itertools.combinations(range(len(genes)), 2)
            )
        null.append(np.mean(shares))
    per_set = {k: same(list(itertools.combinations(g, 2)), modules) for k, g in sets.items()}
    return {
        "within_set_pairs_co_clustered": observed,
        "random_pair_expectation": expected,
        "between_set_pairs_co_clustered": same(between, modules),
        "permutation_p_value": float((1 + np.sum(np.asarray(null) >= observed)) / (1 + len(null))),
        "per_set": per_set,
        "n_modules": len(sizes),
        "n_within_pairs": len(within),
        "modules_of_markers": {g: str(modules[g]) for genes in sets.values() for g in genes},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--max-cells", type=int, default=300)
    parser.add_argument("--n-modules", type=int, default=20)
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--permutations", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet()
    start_all = time.perf_counter()
    model, model_info = load_model(args.model)
    adata = scxtrimo.datasets.pbmc4k()
    norm = log_normalized(adata.X)
    variance = norm.var(axis=0)
    top = set(adata.var_names[np.argsort(-variance)[: args.n_genes]])
    markers = [g for genes in MARKERS.values() for g in genes]
    missing = [g for g in markers if g not in adata.var_names]
    genes = [g for g in adata.var_names if g in top or g in markers]
    cols = adata.var_names.get_indexer(genes)

    embeddings = {}
    log("context embeddings")
    start = time.perf_counter()
    scxtrimo.tl.context_gene_embeddings(
        adata, model, genes=genes, max_cells=args.max_cells, seed=args.seed, batch_size=4
    )
    embeddings["scxtrimo context embedding"] = adata.varm["scxtrimo_context_gene_embedding"][cols]
    context_seconds = time.perf_counter() - start
    scxtrimo.tl.gene_embeddings(adata, model)
    embeddings["scxtrimo gene-embedding table"] = adata.varm["scxtrimo_gene_embedding"][cols]
    x = norm[:, cols]
    embeddings["co-expression (expression across cells)"] = (
        (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    ).T
    untrained = XTrimoGene(None, config=model_info["config"], seed=args.seed + 1)
    scxtrimo.tl.gene_embeddings(adata, untrained, key_added="untrained")
    embeddings["untrained model table (chance)"] = adata.varm["untrained"][cols]

    rows = {}
    for name, emb in embeddings.items():
        for method, kwargs in (
            (
                f"Leiden (resolution {args.resolution:g})",
                {"method": "leiden", "resolution": args.resolution},
            ),
            (
                f"hierarchical ({args.n_modules} modules)",
                {"method": "hierarchical", "n_modules": args.n_modules},
            ),
        ):
            log(f"{name}: {method}")
            labels = scxtrimo.tl.cluster_genes(emb, seed=args.seed, **kwargs)
            rows[f"{name} | {method}"] = pair_scores(
                pd.Series(labels, index=genes), args.permutations, args.seed
            )
    total = time.perf_counter() - start_all
    command = command_line(
        "evaluate_gene_modules.py",
        args.model,
        f" --n-genes {args.n_genes} --max-cells {args.max_cells} --n-modules {args.n_modules}"
        f" --resolution {args.resolution:g} --seed {args.seed}",
    )
    result = run_record(
        command,
        model_info,
        n_genes=len(genes),
        markers_missing=missing,
        context_seconds=context_seconds,
        total_seconds=total,
        results=rows,
    )
    lines = [
        f"Gene modules on pbmc4k: {len(genes):,} genes (the {args.n_genes:,} most variable + "
        f"markers), `{model_info['config']}` model (`{model_info['path']}`)"
        f"; {total / 60:.1f} min on {machine()['torch_threads']} CPU threads. "
        f"Command: `{command}`",
        "",
        "| embedding | clustering | modules | marker pairs co-clustered (within set) | random "
        "pairs (expected) | between-set pairs co-clustered | p (permutation) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        emb_name, method = name.split(" | ")
        lines.append(
            f"| {emb_name} | {method} | {r['n_modules']} | "
            f"{r['within_set_pairs_co_clustered']:.2f} | {r['random_pair_expectation']:.2f} | "
            f"{r['between_set_pairs_co_clustered']:.2f} | {r['permutation_p_value']:.3g} |"
        )
    lines += [
        "",
        "Within-set co-clustering per marker set (Leiden):",
        "",
        "| embedding | " + " | ".join(MARKERS) + " |",
        "|---|" + "---|" * len(MARKERS),
    ]
    for name, r in rows.items():
        if "Leiden" in name:
            lines.append(
                f"| {name.split(' | ')[0]} | "
                + " | ".join(f"{r['per_set'][k]:.2f}" for k in MARKERS)
                + " |"
            )
    write_results(args.out, "evaluate_gene_modules", result, lines)


if __name__ == "__main__":
    main()
