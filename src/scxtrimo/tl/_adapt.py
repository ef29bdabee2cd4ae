"""``scxtrimo.tl.adapt``: a model adapted to the user's own unlabelled cells."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from anndata import AnnData

from scxtrimo._docs import DOCS, doc_params

from ._common import load_model, target_of

if TYPE_CHECKING:
    from mudata import MuData

    from scxtrimo.model import XTrimoGene

__all__ = ["adapt"]


@doc_params(**DOCS)
def adapt(
    adata: AnnData | MuData,
    model: XTrimoGene | str | os.PathLike | None = None,
    *,
    batch_key: str | None = None,
    layer: str | None = None,
    gene_symbols_key: str | None = None,
    gene_ids_key: str | None = None,
    input_type: Literal["counts", "log1p", "bulk"] | None = None,
    total_counts_key: str | None = None,
    max_steps: int = 1000,
    max_time: float | None = None,
    n_layers: int = 0,
    method: Literal["full", "lora"] = "full",
    lora_rank: int = 8,
    head_dim: int = 64,
    batch_size: int = 256,
    lr: float = 1e-3,
    n_neighbors: int = 10,
    cross_batch_share: float = 0.5,
    token_keep: float = 0.5,
    noise: float = 0.1,
    temperature: float = 0.2,
    max_genes: int | Literal["all"] | None = None,
    max_cells: int = 20_000,
    max_memory_gb: float = 4.0,
    checkpoint_dir: str | os.PathLike | None = None,
    invalid_cells: Literal["raise", "skip"] = "skip",
    seed: int = 0,
    mod: str = "rna",
    device: str | None = None,
    progress_bar: bool | None = None,
) -> XTrimoGene:
    """Adapt a model to the user's own cells, self-supervised, before embedding them.

    PCA and scVI are fitted on the cells they embed; a pretrained model has never seen them.
    ``adapt`` fits the model to ``adata``'s unlabelled cells in about the time scVI trains
    (often less), and returns the adapted copy; embed with it as usual
    (``tl.embed(adata, adapted)``). The input and the model passed in are not changed.

    What is trained (details and measurements in the docs' adaptation page): a **cell head**
    (:class:`~scxtrimo.module.CellHead`: standardisation and a two-layer MLP, ``head_dim``
    wide) on the pooled encoder output, which becomes the model's cell embedding
    (``pooling="all"``), and optionally the top ``n_layers`` encoder layers. The frozen part of
    the encoder runs once over the cells (one inference pass, cached), so a step costs only
    what is trained. The objective is InfoNCE between a view of an anchor cell and a view of
    its *positive*: the cell itself or one of its ``n_neighbors`` nearest cells in a PCA of
    ``adata``'s own cells (the neighbourhoods a PCA user sees; labels are never used); with
    ``batch_key``, with probability ``cross_batch_share``, one of its mutual nearest
    neighbours in another batch, so that one cell state measured in different donors or
    protocols is pulled together. A view adds Gaussian noise (``noise``) to the standardised
    pooled vector and, when layers are trained, keeps a random ``token_keep`` share of the
    cell's gene tokens.

    Parameters
    ----------
    adata
        Raw counts (in ``.X`` or ``layer``), in memory or backed; every cell is used (up to
        ``max_cells``), as PCA and scVI use them. A :class:`~mudata.MuData` is read through
        its modality ``mod``.
    model
        The model to start from: an :class:`~scxtrimo.model.XTrimoGene`, a saved-model
        directory, the scFoundation ``models.ckpt`` (or ``"scfoundation"``), or ``None`` for
        the pretrained model shipped with scxtrimo.
    batch_key
        ``obs`` column of batches (donors, protocols, plates): adds the cross-batch
        positives. ``None``: one batch.
    {doc_input_settings}
    max_steps
        Optimisation steps (of ``batch_size`` anchors; the default's cost against scVI's
        default training is measured in the docs).
    max_time
        Wall-time budget in seconds for the steps (``None``: none); training stops at
        whichever budget binds first and the learning-rate schedule ends there. A time
        budget makes the result depend on the machine's speed; ``max_steps`` alone is
        reproducible.
    n_layers
        Top encoder layers trained with the head (with the final LayerNorm); 0 (default):
        the head alone on the frozen encoder, the cheapest (one inference pass, then seconds).
    method
        How the top ``n_layers`` layers train: ``"full"``, all their weights; ``"lora"``,
        low-rank peft adapters of rank ``lora_rank`` on their attention and feed-forward
        projections, their weights frozen (a fraction of the trainable parameters and of the
        optimiser's memory, for large models such as scFoundation's 100M; needs
        ``pip install scxtrimo[lora]`` and ``n_layers >= 1``). The adapters are merged into
        the weights afterwards, so the adapted model embeds at the base model's cost.
    lora_rank
        Rank of each adapter with ``method="lora"``.
    head_dim
        Width of the adapted embedding.
    batch_size
        Anchor cells per step.
    lr
        Peak learning rate (AdamW, 10 warm-up steps, cosine decay).
    n_neighbors
        Neighbours per cell in the PCA that may serve as its positive (0: only itself).
    cross_batch_share
        Probability that an anchor with cross-batch partners gets one as its positive.
    token_keep
        Share of a cell's gene tokens in each view (with ``n_layers >= 1``).
    noise
        Standard deviation of the noise added to a view's standardised pooled vector.
    temperature
        Softmax temperature of InfoNCE.
    max_genes
        Cap on gene tokens per cell; ``None`` uses the model's default (as
        :func:`~scxtrimo.tl.embed` does), ``"all"`` keeps every gene.
    max_cells
        At most this many cells (a seeded random subset) are trained on.
    max_memory_gb
        Memory for the cached frozen-layer outputs; fewer cells are trained on when they
        would need more (a message says how many).
    checkpoint_dir
        Folder for a checkpoint written every 50 steps; an interrupted call resumes from it
        when called again with the same arguments. ``None``: no checkpoint.
    invalid_cells
        Cells with fewer than 2 in-vocabulary counts are ``"skip"``-ped (default: not
        trained on; the log says how many) or ``"raise"`` an error naming them before any
        work. Embedding them afterwards follows :func:`~scxtrimo.tl.embed`'s own setting.
    seed
        Seed of the cell subset, the PCA, anchors, positives and views.
    mod
        Modality to read when ``adata`` is a MuData.
    device
        ``"cpu"``, ``"cuda"``...; default ``scxtrimo.settings.device``.
    progress_bar
        Show progress bars (default ``scxtrimo.settings.progress_bar``).

    Returns
    -------
    The adapted model: a new :class:`~scxtrimo.model.XTrimoGene` (made by
    :meth:`~scxtrimo.model.XTrimoGene.copy`, then :meth:`~scxtrimo.model.XTrimoGene.adapt`)
    whose ``adaptation_`` records the settings, the loss curve and the wall time, and which
    :meth:`~scxtrimo.model.XTrimoGene.save` writes with it.

    Raises
    ------
    ValueError
        Before any training: fewer than 50 usable cells, a ``batch_key`` column with missing
        values, or any input the model cannot read (the message says how to fix it).

    Examples
    --------
    >>> import scxtrimo
    >>> adata = scxtrimo.datasets.pbmc4k()
    >>> adapted = scxtrimo.tl.adapt(adata)
    >>> scxtrimo.tl.embed(adata, adapted, key_added="X_adapted")
    """
    target = target_of(adata, mod)
    net = load_model(model, device=device)
    adapted = net.copy()
    adapted.adapt(
        target,
        batch_key=batch_key,
        input_settings=net.input_settings.merge(
            layer=layer,
            gene_symbols_key=gene_symbols_key,
            gene_ids_key=gene_ids_key,
            input_type=input_type,
            total_counts_key=total_counts_key,
        ),
        max_steps=max_steps,
        max_time=max_time,
        n_layers=n_layers,
        method=method,
        lora_rank=lora_rank,
        head_dim=head_dim,
        batch_size=batch_size,
        lr=lr,
        n_neighbors=n_neighbors,
        cross_batch_share=cross_batch_share,
        token_keep=token_keep,
        noise=noise,
        temperature=temperature,
        max_genes=max_genes,
        max_cells=max_cells,
        max_memory_gb=max_memory_gb,
        checkpoint_dir=checkpoint_dir,
        invalid_cells=invalid_cells,
        seed=seed,
        device=device,
        progress_bar=progress_bar,
    )
    return adapted
