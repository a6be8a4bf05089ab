"""The ``couple`` stage: GradSim (cosine of per-piece gradients) from the shards.

Outputs in ``RUN/coupling`` (all loadable without gradcouple):
``gram.pt`` / ``cosine.pt`` (``{"ids": [...], "gram"|"cosine": (N, N) float64}``, pieces.jsonl
order; with ``top_k``: ``topk.pt`` ``{"ids", "indices" (N, k) int64, "cosine" (N, k) float32}``
instead), ``pairs.csv`` (the most coupled pairs with both pieces' texts),
``pairs_different_answer.csv`` (the same among pairs whose answers differ) and ``stats.json``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .config import RunConfig
from .errors import ArtifactError
from .gram import cosine_from_gram, fit_block_size, gram_matrix, store_plans, topk_cosine
from .io import atomic_open, atomic_torch_save, write_json
from .runinfo import progress_console, peak_rss_bytes
from .store import GradientStore

PAIR_FIELDS = ["rank", "cosine", "same_question", "same_answer", "id_a", "id_b", "question_a", "question_b",
               "prompt_a", "answer_a", "prompt_b", "answer_b"]


def _same_answer(a: dict, b: dict) -> bool:
    return a["answer"].strip().lower() == b["answer"].strip().lower()


def _pair_row(rank: int, cosine: float, a: dict, b: dict, same_question: bool) -> dict:
    """One pairs.csv row (columns PAIR_FIELDS) for manifest entries ``a`` and ``b``."""
    return {"rank": rank, "cosine": f"{cosine:.6f}", "same_question": same_question, "same_answer": _same_answer(a, b),
            "id_a": a["id"], "id_b": b["id"], "question_a": a.get("question_id"), "question_b": b.get("question_id"),
            "prompt_a": a["prompt"], "answer_a": a["answer"], "prompt_b": b["prompt"], "answer_b": b["answer"]}


def _write_rows(path: Path, rows: list[dict]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=PAIR_FIELDS)
        w.writeheader()
        w.writerows(rows)


@dataclass
class CoupleResult:
    """Where the outputs are, and the headline figures."""

    out_dir: Path
    n: int
    mode: str
    seconds: float
    stats: dict


def _memory_budget(cfg: RunConfig) -> float:
    if cfg.couple.max_memory:
        return cfg.couple.max_memory * 2**30
    import psutil

    return psutil.virtual_memory().total / 4


def pair_stats(cos: torch.Tensor, questions: list[set[str]], thresholds: list[float],
               answers: list[str] | None = None) -> dict:
    """Statistics of the off-diagonal cosines (each unordered pair once).

    ``same_question`` pairs share an owning multi-hop question id; ``cross_question`` pairs do not.
    With ``answers``, pairs are also split by whether the two pieces score the same answer
    string (case-insensitive): a shared answer token sequence alone makes gradients similar
    (same output-gradient directions), so coupling between different facts is best read on
    ``different_answer`` pairs. Counts above a threshold t count pairs with cosine > t and with
    |cosine| > t.
    """
    n = cos.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    vals = cos[iu[0], iu[1]]
    qid = {q: k for k, q in enumerate(sorted(set().union(*questions)))} if questions else {}
    member = torch.zeros(n, max(1, len(qid)), dtype=torch.float32)
    for i, qs in enumerate(questions):
        for q in qs:
            member[i, qid[q]] = 1.0
    shared = (member @ member.t()) > 0
    same = shared[iu[0], iu[1]]

    def summary(v: torch.Tensor) -> dict:
        if v.numel() == 0:
            return {"pairs": 0, "mean": None, "std": None, "min": None, "max": None}
        return {"pairs": int(v.numel()), "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
                "min": float(v.min()), "max": float(v.max())}

    out = {"n_pieces": n, **summary(vals), "median": float(vals.median()) if vals.numel() else None,
           "above": {str(t): int((vals > t).sum()) for t in thresholds},
           "abs_above": {str(t): int((vals.abs() > t).sum()) for t in thresholds},
           "same_question": summary(vals[same]), "cross_question": summary(vals[~same])}
    if answers is not None:
        norm = [a.strip().lower() for a in answers]
        aid = {a: k for k, a in enumerate(sorted(set(norm)))}
        codes = torch.tensor([aid[a] for a in norm])
        same_ans = codes[iu[0]] == codes[iu[1]]
        out.update({"same_answer": summary(vals[same_ans]), "different_answer": summary(vals[~same_ans]),
                    "same_question_different_answer": summary(vals[same & ~same_ans]),
                    "cross_question_different_answer": summary(vals[~same & ~same_ans])})
    return out


def _owners(meta: dict, piece_owners: dict[str, list[str]]) -> set[str]:
    return set(piece_owners.get(meta["id"]) or [meta.get("question_id", meta["id"])])


def write_pairs(out_dir: Path, cos: torch.Tensor, metas: list[dict], questions: list[set[str]], top: int) -> None:
    """Atomically write the ``top`` most coupled unordered pairs to ``pairs.csv``, and the ``top``
    most coupled pairs whose answers differ to ``pairs_different_answer.csv`` (columns PAIR_FIELDS)."""
    n = cos.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    vals = cos[iu[0], iu[1]]
    order = vals.argsort(descending=True).tolist()
    rows_all, rows_diff = [], []
    for b in order:
        if len(rows_all) >= top and len(rows_diff) >= top:
            break
        i, j = int(iu[0, b]), int(iu[1, b])
        same_q = bool(questions[i] & questions[j])
        if len(rows_all) < top:
            rows_all.append(_pair_row(len(rows_all) + 1, float(cos[i, j]), metas[i], metas[j], same_q))
        if len(rows_diff) < top and not _same_answer(metas[i], metas[j]):
            rows_diff.append(_pair_row(len(rows_diff) + 1, float(cos[i, j]), metas[i], metas[j], same_q))
    _write_rows(out_dir / "pairs.csv", rows_all)
    _write_rows(out_dir / "pairs_different_answer.csv", rows_diff)


def couple(cfg: RunConfig, run_dir: str | Path, *, show_progress: bool = True) -> CoupleResult:
    """Compute GradSim for every pair of pieces in ``run_dir`` (or the top-k per piece).

    The full matrix is used when ``couple.top_k`` is unset and 3 N^2 float64 numbers fit in
    the memory budget (``couple.max_memory`` GiB, default a quarter of RAM).

    Raises:
        ArtifactError: no complete extraction in ``run_dir``.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    store = GradientStore(run_dir / "gradients")
    metas = store.manifest["pieces"]
    owners: dict[str, list[str]] = {}
    ppath = run_dir / "pieces.jsonl"
    if ppath.is_file():
        for line in ppath.read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                owners[obj["id"]] = obj.get("owners") or [obj["question_id"]]
    questions = [_owners(m, owners) for m in metas]
    out = run_dir / "coupling"
    out.mkdir(parents=True, exist_ok=True)
    N = store.n
    budget = _memory_budget(cfg)
    top_k = cfg.couple.top_k
    if top_k is None and 3 * N * N * 8 > budget:
        top_k = 10
    plans = store_plans(store, cfg.couple.method, cfg.couple.block_size)
    bs = fit_block_size(store, plans, cfg.couple.block_size, budget)
    n_blocks = math.ceil(N / bs)
    ids = [m["id"] for m in metas]
    cols = [TextColumn("[bold]couple"), BarColumn(), MofNCompleteColumn(), TextColumn("blocks"), TimeRemainingColumn()]
    with Progress(*cols, console=progress_console(), disable=not show_progress) as prog:
        if top_k is None:
            task = prog.add_task("couple", total=n_blocks * (n_blocks + 1) // 2)
            G = gram_matrix(store, bs, cfg.couple.method, progress=lambda k: prog.advance(task, k), max_memory=budget)
            cos = cosine_from_gram(G)
            atomic_torch_save({"ids": ids, "gram": G}, out / "gram.pt")
            atomic_torch_save({"ids": ids, "cosine": cos}, out / "cosine.pt")
            (out / "topk.pt").unlink(missing_ok=True)
            stats = pair_stats(cos, questions, cfg.couple.thresholds, [m["answer"] for m in metas])
            write_pairs(out, cos, metas, questions, cfg.couple.top_pairs)
            mode = "full"
        else:
            task = prog.add_task("couple", total=n_blocks * (n_blocks + 1) // 2)
            idx, vals = topk_cosine(store, top_k, bs, cfg.couple.method, progress=lambda k: prog.advance(task, k), max_memory=budget)
            atomic_torch_save({"ids": ids, "indices": idx, "cosine": vals}, out / "topk.pt")
            for stale in ("cosine.pt", "gram.pt", "pairs_different_answer.csv"):
                (out / stale).unlink(missing_ok=True)
            stats = _topk_stats(idx, vals, metas, questions, out / "pairs.csv", cfg.couple.top_pairs)
            mode = f"top{top_k}"
    seconds = time.perf_counter() - t0
    stats.update({"mode": mode, "store": store.store, "n_params": store.manifest.get("n_params"),
                  "methods": {p.name: p.method for p in plans}, "block_size": bs, "seconds": seconds,
                  "peak_rss_bytes": peak_rss_bytes(), "config_hash": store.manifest.get("config_hash"),
                  "pieces_sha256": store.manifest.get("pieces_sha256")})
    write_json(out / "stats.json", stats)
    return CoupleResult(out, N, mode, seconds, stats)


def _topk_stats(idx, vals, metas, questions, pairs_path: Path, top: int) -> dict:
    n, k = idx.shape
    seen: dict[tuple[int, int], float] = {}
    for i in range(n):
        for c in range(k):
            j = int(idx[i, c])
            seen[(min(i, j), max(i, j))] = float(vals[i, c])
    rows = sorted(((c, i, j) for (i, j), c in seen.items()), reverse=True)
    _write_rows(pairs_path, [_pair_row(rank, c, metas[i], metas[j], bool(questions[i] & questions[j]))
                             for rank, (c, i, j) in enumerate(rows[:top], 1)])
    v = vals.flatten().double()
    return {"n_pieces": n, "note": f"statistics over each piece's {k} nearest neighbours only",
            "pairs": int(v.numel()), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}


def load_cosine(run_dir: str | Path) -> tuple[list[str], torch.Tensor]:
    """(ids, (N, N) float64 cosine) from ``run_dir/coupling/cosine.pt``.

    Raises:
        ArtifactError: not computed yet, or computed in top-k mode.
    """
    p = Path(run_dir) / "coupling" / "cosine.pt"
    if not p.is_file():
        raise ArtifactError(f"{p}: no full coupling matrix; run `gradcouple couple --run {run_dir}` (without --top-k) first.")
    d = torch.load(p, weights_only=True)
    return d["ids"], d["cosine"]
