"""The ``couple`` stage: GradSim (cosine of per-piece gradients) from the shards.

Outputs in ``RUN/coupling`` (loadable without gradcouple; see :class:`~gradcouple.rundir.RunDir`):
``gram.pt`` / ``cosine.pt`` (N x N float64, pieces.jsonl order) or, with ``top_k``, ``topk.pt``;
``pairs.csv`` (the most coupled pairs with both pieces' texts), ``pairs_different_answer.csv``
(the same among pairs whose answers differ) and ``stats.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import BaseModel

from .artifacts import CouplingStats, PairRow, PairSplit, PieceRecord
from .config import RunConfig
from .gram import cosine_from_gram, fit_block_size, gram_matrix, n_block_pairs, plan_methods, topk_cosine
from .metrics import describe
from .progress import progress
from .rules import same_answer, same_answer_matrix, same_question, same_question_matrix
from .rundir import RunDir, locked
from .runinfo import peak_rss_bytes
from .stores import GradientReader


class CoupleResult(BaseModel):
    """Where the outputs are, and the statistics written to stats.json."""

    out_dir: Path
    n: int
    mode: str
    seconds: float
    stats: CouplingStats


def memory_budget(cfg: RunConfig) -> float:
    """Bytes couple may use: ``couple.max_memory`` GiB, default a quarter of RAM."""
    if cfg.couple.max_memory:
        return cfg.couple.max_memory * 2**30
    import psutil

    return psutil.virtual_memory().total / 4


def upper_pairs(cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i, j, GradSim) of every unordered off-diagonal pair of an (N, N) matrix, i < j."""
    n = cos.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    return i, j, cos[i, j]


def neighbour_pairs(idx: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i, j, GradSim) of every unordered pair kept in top-k mode (each once, i < j)."""
    seen: dict[tuple[int, int], float] = {}
    for i, (js, cs) in enumerate(zip(idx.tolist(), vals.tolist())):
        for j, c in zip(js, cs):
            if j != i:
                seen.setdefault((min(i, j), max(i, j)), c)
    keys = sorted(seen)
    return (torch.tensor([a for a, _ in keys], dtype=torch.long), torch.tensor([b for _, b in keys], dtype=torch.long),
            torch.tensor([seen[k] for k in keys], dtype=torch.float64))


def pair_split(i: torch.Tensor, j: torch.Tensor, vals: torch.Tensor, records: list[PieceRecord]) -> PairSplit:
    """GradSim of the pairs (i, j, vals), split by the same-question and same-answer rules
    (:mod:`gradcouple.rules`). A shared answer token sequence alone makes gradients similar, so
    coupling between different facts is best read on different-answer pairs."""
    sq = same_question_matrix([r.owners for r in records])[i, j]
    sa = same_answer_matrix([r.answer for r in records])[i, j]
    return PairSplit(all=describe(vals), same_question=describe(vals[sq]), cross_question=describe(vals[~sq]),
                     same_answer=describe(vals[sa]), different_answer=describe(vals[~sa]),
                     same_question_different_answer=describe(vals[sq & ~sa]),
                     cross_question_different_answer=describe(vals[~sq & ~sa]))


def threshold_counts(values: torch.Tensor, thresholds: list[float]) -> dict[str, int]:
    """Threshold (as a string key) -> how many of ``values`` exceed it."""
    return {str(t): int((values > t).sum()) for t in thresholds}


def pair_row(rank: int, cosine: float, a: PieceRecord, b: PieceRecord) -> PairRow:
    """One pairs.csv row for pieces ``a`` and ``b``."""
    return PairRow(rank=rank, cosine=cosine, same_question=same_question(a.owners, b.owners),
                   same_answer=same_answer(a.answer, b.answer), id_a=a.id, id_b=b.id, question_a=a.question_id,
                   question_b=b.question_id, prompt_a=a.prompt, answer_a=a.answer, prompt_b=b.prompt, answer_b=b.answer)


def top_pairs(cos: torch.Tensor, records: list[PieceRecord], top: int) -> tuple[list[PairRow], list[PairRow]]:
    """The ``top`` most coupled unordered pairs, and the ``top`` most coupled with different answers."""
    ii, jj, vals = upper_pairs(cos)
    rows_all, rows_diff = [], []
    for b in vals.argsort(descending=True).tolist():
        if len(rows_all) >= top and len(rows_diff) >= top:
            break
        i, j = int(ii[b]), int(jj[b])
        if len(rows_all) < top:
            rows_all.append(pair_row(len(rows_all) + 1, float(cos[i, j]), records[i], records[j]))
        if len(rows_diff) < top and not same_answer(records[i].answer, records[j].answer):
            rows_diff.append(pair_row(len(rows_diff) + 1, float(cos[i, j]), records[i], records[j]))
    return rows_all, rows_diff


def topk_pairs(idx: torch.Tensor, vals: torch.Tensor, records: list[PieceRecord], top: int) -> list[PairRow]:
    """The ``top`` most coupled unordered pairs among each piece's kept neighbours (top-k mode)."""
    ii, jj, v = neighbour_pairs(idx, vals)
    best = sorted(zip(v.tolist(), ii.tolist(), jj.tolist()), reverse=True)[:top]
    return [pair_row(rank, c, records[i], records[j]) for rank, (c, i, j) in enumerate(best, 1)]


@locked("couple")
def couple(cfg: RunConfig, run_dir: str | Path, *, show_progress: bool = True) -> CoupleResult:
    """Compute GradSim for every pair of pieces in ``run_dir`` (or the top-k per piece).

    The full matrix is used when ``couple.top_k`` is unset and 3 N^2 float64 numbers fit in the
    memory budget (:func:`memory_budget`); otherwise the top 10 per piece.

    Raises:
        ArtifactError: no complete extraction in ``run_dir``, or a damaged shard.
    """
    t0, run = time.perf_counter(), RunDir(run_dir)
    reader = GradientReader(run)
    records, ids, n = reader.manifest.records(), [p.id for p in reader.manifest.records()], reader.n
    budget, top_k = memory_budget(cfg), cfg.couple.top_k
    if top_k is None and 3 * n * n * 8 > budget:
        top_k = 10
    methods = plan_methods(reader, cfg.couple.method, cfg.couple.block_size)
    bs = fit_block_size(reader, methods, cfg.couple.block_size, budget)
    with progress("couple", n_block_pairs(n, bs), "blocks", show_progress) as advance:
        if top_k is None:
            G = gram_matrix(reader, bs, methods, progress=advance, max_memory=budget)
            cos = cosine_from_gram(G)
            matrix_sha = run.save_full_coupling(ids, G, cos)
            pairs, note, mode = upper_pairs(cos), None, "full"
            rows, rows_diff = top_pairs(cos, records, cfg.couple.top_pairs)
            run.save_pairs(rows_diff, different_answer=True)
        else:
            idx, vals = topk_cosine(reader, top_k, bs, methods, progress=advance, max_memory=budget)
            matrix_sha = run.save_topk_coupling(ids, idx, vals)
            pairs, mode = neighbour_pairs(idx, vals), f"top{top_k}"
            note = f"statistics over each piece's {idx.shape[1]} nearest neighbours only"
            rows = topk_pairs(idx, vals, records, cfg.couple.top_pairs)
    v = pairs[2]
    run.save_pairs(rows)
    stats = CouplingStats(inputs=run.coupling_inputs(reader.manifest, cfg), matrix_sha256=matrix_sha, mode=mode,
                          n_pieces=n, pairs=pair_split(*pairs, records), note=note,
                          above=threshold_counts(v, cfg.couple.thresholds),
                          abs_above=threshold_counts(v.abs(), cfg.couple.thresholds),
                          store=reader.manifest.store.kind, n_params=reader.manifest.n_params, methods=methods,
                          block_size=bs, seconds=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes())
    run.save_stats(stats)
    return CoupleResult(out_dir=run.coupling_dir, n=n, mode=mode, seconds=stats.seconds, stats=stats)



from ._callable import make_callable  # noqa: E402

make_callable(__name__)
