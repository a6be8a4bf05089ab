"""The pairs of a coupling: enumerating them (full matrix or top-k lists), splitting their GradSim
by the same-question and same-answer rules, and the most coupled rows of ``pairs.csv``."""

from __future__ import annotations

import torch

from .artifacts import PairRow, PairSplit, PieceRecord
from .metrics import describe
from .rules import same_answer, same_answer_matrix, same_question, same_question_matrix


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
