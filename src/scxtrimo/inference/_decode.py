"""The decoder pass: context-free and per-cell gene embeddings, and predicted expression."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from scxtrimo._settings import settings
from scxtrimo.data._matrix import as_row_accessible, read_rows
from scxtrimo.data._tokens import TokenIndex, inference_batch
from scxtrimo.data._vocabulary import load_vocabulary

from ._prepare import PreparedInput, resolve_device

if TYPE_CHECKING:
    from scxtrimo.module import XTrimoGeneModule

DecoderOutput = Literal["embeddings", "expression"]


def gene_embedding_table(
    module: XTrimoGeneModule, genes: Sequence[str] | None = None
) -> pd.DataFrame:
    """The context-free gene embeddings, one row per vocabulary gene (or per ``genes``)."""
    vocab = load_vocabulary()
    weight = module.gene_embedding_table().detach().float().cpu().numpy()
    frame = pd.DataFrame(weight[: vocab.n_genes], index=vocab.symbols.copy())
    return frame if genes is None else frame.loc[list(genes)]


def vocabulary_positions(genes: Sequence[str] | None) -> np.ndarray:
    """Vocabulary positions of the gene symbols ``genes`` (default: every vocabulary gene)."""
    vocab = load_vocabulary()
    if genes is None:
        return np.arange(vocab.n_genes)
    lookup = pd.Series(np.arange(vocab.n_genes), index=vocab.symbols)
    missing = [g for g in genes if g not in lookup.index]
    if missing:
        raise KeyError(f"{len(missing)} genes are not in the vocabulary, e.g. {missing[:5]}.")
    return lookup.loc[list(genes)].to_numpy()


@torch.inference_mode()
def iter_decoder(
    module: XTrimoGeneModule,
    prep: PreparedInput,
    *,
    output: DecoderOutput,
    genes: Sequence[str] | None = None,
    batch_size: int = 4,
    key_stabilizer: Literal["cell", "batch"] = "cell",
    device: str | torch.device | None = None,
    progress_bar: bool | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Run encoder + decoder over ``prep.cells`` in their order, ``batch_size`` cells at a time.

    Memory stays bounded by ``batch_size`` x genes x decoder width. To decode a subset of the
    checked cells, pass ``prep.with_cells(cells)``.

    Parameters
    ----------
    module
        The network (``model.module``); moved to ``device`` and set to eval mode.
    prep
        Checked input, from :func:`prepare_input`.
    output
        ``"embeddings"``: context-specific gene embeddings; ``"expression"``: the decoder's
        predicted expression (``log1p(x / total * 1e4)`` scale).
    genes
        Vocabulary gene symbols to return (default all, in vocabulary order).
    batch_size
        Cells per decoder pass.
    key_stabilizer
        ``"cell"`` (batch-independent results) or ``"batch"`` (the official batched numerics).
    device
        Where to compute; default: where the module's weights are.
    progress_bar
        Show a progress bar (default ``scxtrimo.settings.progress_bar``).

    Yields
    ------
    ``(cells, values)``: the rows of the chunk and the decoder's output at ``genes`` for each,
    ``[cells, genes, d]`` (embeddings) or ``[cells, genes]`` (expression).
    """
    if output not in ("embeddings", "expression"):
        raise ValueError(f"output must be 'embeddings' or 'expression', not {output!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    gene_positions = vocabulary_positions(genes)
    dev = resolve_device(module, device)
    module = module.to(dev).eval()
    genes_t = torch.as_tensor(gene_positions, dtype=torch.int64, device=dev)
    index = TokenIndex(module.config.n_genes)
    show = settings.progress_bar if progress_bar is None else progress_bar
    matrix = as_row_accessible(prep.matrix)
    cells = prep.cells
    decode = module.gene_embeddings if output == "embeddings" else module.expression
    with tqdm(total=len(cells), desc="Decoding cells", unit="cell", disable=not show) as bar:
        for start in range(0, len(cells), batch_size):
            chunk = cells[start : start + batch_size]
            # Read the chunk's rows in file order (one contiguous read), then restore its order.
            order = np.argsort(chunk)
            rows = chunk[order]
            block = read_rows(matrix, int(rows[0]), int(rows[-1]) + 1)
            totals = None if prep.total_counts is None else prep.total_counts[chunk]
            tokens = inference_batch(
                block,
                rows - rows[0],
                prep.mapping.col_to_vocab,
                prep.spec,
                index,
                None if totals is None else totals[order],
            )
            batch = {k: torch.from_numpy(v).to(dev) for k, v in tokens.items()}
            h = module.encode(batch["gene_index"], batch["value"], batch["padding_mask"])
            out = decode(
                h,
                batch["gene_index"],
                batch["padding_mask"],
                key_stabilizer=key_stabilizer,
                genes=genes_t,
            )
            restore = np.empty_like(order)
            restore[order] = np.arange(len(order))
            yield chunk, out.float().cpu().numpy()[restore]
            bar.update(len(chunk))
