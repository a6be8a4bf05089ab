"""The ``couple`` stage: GradSim (cosine of per-piece gradients) from the shards.

Outputs in ``RUN/coupling`` (loadable without gradcouple; see :class:`~gradcouple.rundir.RunDir`):
``gram.pt`` / ``cosine.pt`` (N x N float64, pieces.jsonl order) or, with ``top_k``, ``topk.pt``;
``pairs.csv`` (the most coupled pairs with both pieces' texts), ``pairs_different_answer.csv``
(the same among pairs whose answers differ) and ``stats.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import psutil
import torch
from pydantic import BaseModel, Field

from ..artifacts import CouplingStats
from ..config import RunConfig
from ..errors import ConfigError
from ..gram import (
    LayerParts,
    cosine_from_gram,
    fit_block_size,
    gram_matrix,
    layer_contributions,
    n_block_pairs,
    plan_methods,
    topk_cosine,
)
from ..layers import block_of_name, block_spec, parse_block_spec
from ..models import resolve_device
from ..pairs import neighbour_pairs, pair_split, threshold_counts, top_pairs, topk_pairs, upper_pairs
from ..progress import progress
from ..ranks import rank_device
from ..rundir import RunDir, locked
from ..runinfo import human_bytes, peak_rss_bytes, use_threads
from ..stores import GradientReader
from .extract import ExtractResult
from .gram_share import GramShare, gram_share

LAYER_PAIRS = 20  # the most coupled pairs whose GradSim is split by target layer in stats.json


class CoupleResult(BaseModel):
    """Where the outputs are, and the statistics written to stats.json."""

    out_dir: Path
    stats_json: Path
    n: int
    mode: str
    seconds: float
    stats: CouplingStats
    extract: Optional[ExtractResult] = Field(None, description="The extraction couple made or found first (couple --model)")


def memory_budget(cfg: RunConfig) -> float:
    """Bytes couple may use: ``couple.max_memory`` GiB, default a quarter of RAM."""
    if cfg.couple.max_memory:
        return cfg.couple.max_memory * 2**30
    return psutil.virtual_memory().total / 4


def full_matrix_bytes(n: int) -> int:
    """Bytes the full mode needs: three N x N float64 matrices (Gram, cosine and the pair statistics)."""
    return 3 * n * n * 8


def too_large_message(cfg: RunConfig, n: int, budget: float) -> str:
    """The one line refusing a full matrix over the memory bound: the bytes it needs, and the two ways on."""
    need = full_matrix_bytes(n)
    gib = -(-need // 2**28) / 4  # the need in GiB, rounded up to a quarter
    bound = (f"--max-memory {cfg.couple.max_memory:g} allows {int(budget):,} bytes" if cfg.couple.max_memory
             else f"the default bound, a quarter of RAM, is {int(budget):,} bytes")
    return (f"the full {n} x {n} GradSim matrix needs {need:,} bytes ({human_bytes(need)}: Gram, cosine and pair "
            f"statistics in float64) but {bound}; pass --top-k K (e.g. --top-k 10) to keep each piece's K most similar "
            f"pieces, or --max-memory {gib:g} or more if the machine has it.")


def compute_device(spec: Optional[str]) -> Optional[torch.device]:
    """The device of couple's Gram blocks: a CUDA device when ``spec`` names one (``cuda``,
    ``cuda:N``; under torchrun ``cuda`` is the rank's own GPU), else None (the CPU, as always).

    Raises:
        ModelError: ``spec`` names a CUDA device this machine does not have.
    """
    if not spec or not str(spec).startswith("cuda"):
        return None
    return resolve_device(rank_device(str(spec)))


def _follow(share: GramShare, run: RunDir, reader: GradientReader, layers: LayerParts, budget: float,
            device: Optional[torch.device], t0: float) -> CoupleResult:
    """A rank other than 0: compute this rank's block rows, hand them to rank 0, wait for its
    files and return the same :class:`CoupleResult`."""
    if share.top_k is None:
        gram_matrix(reader, share.block_size, share.methods, max_memory=budget, layers=layers, share=share, device=device)
    else:
        topk_cosine(reader, share.top_k, share.block_size, share.methods, max_memory=budget, layers=layers, share=share,
                    device=device)
    share.done()
    stats = run.coupling.load_stats()
    return CoupleResult(out_dir=run.coupling.dir, stats_json=run.coupling.stats_path, n=reader.n, mode=stats.mode, seconds=time.perf_counter() - t0, stats=stats)


def coupling_reader(run: RunDir, cfg: RunConfig) -> GradientReader:
    """The run's gradients, read over the layers GradSim is computed on (``couple.layers``).

    Raises:
        ConfigError: ``couple.layers`` names a block the extraction lacks (the message lists what it has).
    """
    reader = GradientReader(run)
    if cfg.couple.layers:
        have = {block_of_name(n): n for n in reader.names}
        n_blocks = max(b for b in have if b is not None) + 1 if any(b is not None for b in have) else 0
        try:
            wanted = parse_block_spec(cfg.couple.layers, n_blocks) if n_blocks else []
        except ConfigError:
            wanted = []
        missing = [b for b in wanted if b not in have]
        if missing or not wanted:
            raise ConfigError(f"--couple-layers {cfg.couple.layers}: the extraction in {run.root} has blocks "
                              f"{block_spec([b for b in have if b is not None]) or 'none'}; choose among them.")
        reader.names = [have[b] for b in wanted]
    return reader


@locked("couple")
def couple(cfg: RunConfig, run_dir: str | Path, *, show_progress: bool = True,
           fallback_top_k: int | None = None) -> CoupleResult:
    """Compute GradSim for every pair of pieces in ``run_dir`` (or the top-k per piece).

    The full matrix is used when ``couple.top_k`` is unset; it must fit in the memory budget
    (:func:`memory_budget`, :func:`full_matrix_bytes`). When it does not, the stage refuses, or
    with ``fallback_top_k`` keeps that many neighbours per piece instead and says so in the
    statistics' note (``gradcouple run`` does this).

    Raises:
        ConfigError: the full matrix exceeds the memory budget (without ``couple.top_k`` or
            ``fallback_top_k``); ``couple.method`` 'factored' on a store that keeps no factors.
        ArtifactError: no complete extraction in ``run_dir``, or a damaged shard.
    """
    t0, run = time.perf_counter(), RunDir(run_dir)
    use_threads(cfg.model.threads)
    reader = coupling_reader(run, cfg)
    records, ids, n = reader.manifest.records(), [p.id for p in reader.manifest.records()], reader.n
    budget, top_k, switched = memory_budget(cfg), cfg.couple.top_k, None
    if top_k is None and full_matrix_bytes(n) > budget:
        if fallback_top_k is None:
            raise ConfigError(too_large_message(cfg, n, budget))
        top_k = fallback_top_k
        switched = (f"top {top_k} per piece instead of the full matrix, which needs {full_matrix_bytes(n):,} bytes, more "
                    f"than the memory bound of {int(budget):,} bytes")
    if cfg.couple.method == "factored" and reader.manifest.store.kind != "factors":
        raise ConfigError(f"--method factored: the {reader.manifest.store.kind} store in {run.root} keeps no factors, "
                          f"so its Gram blocks are dense products; drop --method, or extract with --store factors.")
    methods = plan_methods(reader, cfg.couple.method, cfg.couple.block_size)
    bs = fit_block_size(reader, methods, cfg.couple.block_size, budget)
    layers = LayerParts.of(reader, bs)
    device, share = compute_device(cfg.model.device), gram_share(reader, bs, top_k, methods)  # share: torchrun only
    if share is not None:
        bs, top_k, methods = share.block_size, share.top_k, share.methods  # rank 0's
        if not share.main:
            return _follow(share, run, reader, layers, budget, device, t0)
    with progress("couple", share.n_pairs if share else n_block_pairs(n, bs), "blocks", show_progress) as advance:
        if top_k is None:
            G = gram_matrix(reader, bs, methods, progress=advance, max_memory=budget, layers=layers, share=share,
                            device=device)
            cos = cosine_from_gram(G)
            matrix_sha = run.coupling.save_full(ids, G, cos)
            pairs, note, mode = upper_pairs(cos), None, "full"
            rows, rows_diff = top_pairs(cos, records, cfg.couple.top_pairs)
            run.coupling.save_pairs(rows_diff, different_answer=True)
        else:
            idx, vals = topk_cosine(reader, top_k, bs, methods, progress=advance, max_memory=budget, layers=layers,
                                    share=share, device=device)
            matrix_sha = run.coupling.save_topk(ids, idx, vals)
            pairs, mode = neighbour_pairs(idx, vals), f"top{top_k}"
            note = f"statistics over each piece's {idx.shape[1]} nearest neighbours only"
            if switched:
                note = f"{switched}; {note}"
            rows = topk_pairs(idx, vals, records, cfg.couple.top_pairs)
    v = pairs[2]
    run.coupling.save_pairs(rows)
    pos = {pid: k for k, pid in enumerate(ids)}
    split = layer_contributions(reader, methods, layers, [(pos[r.id_a], pos[r.id_b], r.cosine) for r in rows[:LAYER_PAIRS]])
    stats = CouplingStats(inputs=run.coupling.inputs(reader.manifest, cfg), matrix_sha256=matrix_sha, mode=mode,
                          n_pieces=n, pairs=pair_split(*pairs, records), note=note,
                          above=threshold_counts(v, cfg.couple.thresholds),
                          abs_above=threshold_counts(v.abs(), cfg.couple.thresholds),
                          store=reader.manifest.store.kind, n_params=reader.manifest.n_params, methods=methods,
                          block_size=bs, seconds=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(), layers=split)
    run.coupling.save_stats(stats)
    if share is not None:
        share.done()  # the other ranks return once every file is written
    return CoupleResult(out_dir=run.coupling.dir, stats_json=run.coupling.stats_path, n=n, mode=mode, seconds=stats.seconds, stats=stats)
