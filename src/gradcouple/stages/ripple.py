"""The ``ripple`` stage: real edits, their measured ripple effect, and how well coupling predicts it.

An edit moves theta by Delta theta to make piece i answer a*. To first order every piece j
moves by Delta log P_j ~= <g_j, Delta theta> (the first-order prediction, from the actual update
and the stored gradients). The coupling prediction uses only GradSim and norms:
<g_i, Delta theta> * cos(i, j) * |g_j| / |g_i| (see :data:`gradcouple.metrics.DEFINITIONS`).

Each edit (:mod:`gradcouple.edits`) is either gradient-step fine-tuning of the target layers or
a ROME-style rank-one update of one target layer; the touched weights are copied before and
restored bit for bit after, as EasyEdit does. Every setting of the extraction (model, layers,
prompt template, max length, batch size) is read from the run directory, so the edited model
scores exactly the strings the gradients were taken of.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from pydantic import BaseModel

from ..artifacts import (
    BenchmarkSummary,
    EditRecord,
    LayerSweepSummary,
    Measurement,
    PooledRipple,
    RippleSummary,
    SweepSummary,
)
from ..config import RunConfig
from ..edits import EditMethod, Rewrite, edit_norm, edited
from ..errors import DataError
from ..gram import first_order
from ..metrics import DEFINITIONS, bootstrap_interval, describe, pearson, precision_at_k, spearman
from ..models import LoadedModel
from ..pieces import KnowledgePiece, PieceKind, PieceRole
from ..progress import progress
from ..rules import AnswerMatch, answers_match, same_answer, same_question
from ..rundir import locked
from ..runinfo import device_info, use_threads
from ..scoring import encode, measure_logprobs
from ..suffix import lowest_block
from .benchmark import benchmark_edits, evaluate_benchmark, layer_sweep, sweep_benchmark
from .edit_run import RippleRun, check_run

log = logging.getLogger(__name__)

#: the per-edit metrics whose spread over edits the summary reports
PER_EDIT = ("spearman_coupling", "spearman_first_order", "pearson_first_order", "precision_at_k")


class NothingToEdit(DataError):
    """No piece has a counterfactual, and no two pieces of one kind have different answers."""


class RippleResult(BaseModel):
    """The result set written (``out_dir``, named ``results``, with its main file ``path``) and its
    summary (pieces or benchmark mode) or sweep."""

    out_dir: Path
    results: str
    path: Path
    summary: Optional[RippleSummary | BenchmarkSummary]
    sweep: Optional[SweepSummary] = None
    layer_sweep: Optional[LayerSweepSummary] = None


@dataclass(frozen=True)
class PlannedEdit:
    """Piece ``index`` is edited to answer ``new_answer``; ``source`` is 'dataset' or 'substitute'."""

    index: int
    new_answer: str
    source: str


def choose_edits(pieces: list[KnowledgePiece], n: int, seed: int) -> list[PlannedEdit]:
    """Up to ``n`` edits. Single-hop and cloze pieces with a dataset counterfactual come first; the
    rest get a substitute: the answer of another piece of the same kind that does not match the
    piece's answer or aliases (alias rule), a seeded choice, as CounterFact and MQuAKE build them."""
    rng = random.Random(seed)
    facts = [i for i, p in enumerate(pieces) if p.kind != PieceKind.multi_hop] or list(range(len(pieces)))
    with_cf = [i for i in facts if pieces[i].counterfactual]
    rng.shuffle(with_cf)
    chosen = [PlannedEdit(i, pieces[i].counterfactual, "dataset") for i in with_cf[:n]]
    rest = [i for i in facts if not pieces[i].counterfactual]
    rng.shuffle(rest)
    for i in rest:
        if len(chosen) >= n:
            break
        p = pieces[i]
        pool = sorted({q.answer for q in pieces if q.kind == p.kind
                       and not answers_match(q.answer.strip(), p.answer, p.aliases, AnswerMatch.alias)})
        if pool:
            chosen.append(PlannedEdit(i, rng.choice(pool), "substitute"))
    return chosen


@dataclass
class AppliedEdit:
    """An edit's weight change per target and the log-probs it produced (nats); weights already restored."""

    deltas: dict[str, torch.Tensor]
    new_before: float
    new_after: float
    after: torch.Tensor
    restored: bool
    prompt: str


def apply_edit(r: RippleRun, method: EditMethod, edit: PlannedEdit) -> AppliedEdit:
    """Edit the model toward ``edit.new_answer`` with ``method``, measure every piece, and restore the
    weights bit for bit.

    Raises:
        RuntimeError: the weights could not be restored exactly (a bug; nothing more is measured).
    """
    piece, pad = r.pieces[edit.index], r.loaded.pad_id
    prompt, new_ans = piece.render_answer(edit.new_answer, r.template)
    enc_new = encode(r.loaded.tokenizer, prompt, new_ans, r.max_length, where=f"edit of {piece.id}: ")
    new_before = float(measure_logprobs(r.loaded.model, [enc_new], 1, pad)[0])
    subject = piece.triple.subject if piece.triple else None
    with edited(method, r.context(), [Rewrite(enc_new, subject=subject)]) as deltas:
        after = measure_logprobs(r.loaded.model, r.encoded, r.manifest.batch_size, pad)
        new_after = float(measure_logprobs(r.loaded.model, [enc_new], 1, pad)[0])
    return AppliedEdit(deltas, new_before, new_after, after, True, prompt)


def record_edit(r: RippleRun, e: int, edit: PlannedEdit, applied: AppliedEdit,
                seconds: float) -> tuple[EditRecord, list[Measurement], tuple[torch.Tensor, ...]]:
    """Score the predictors against the measured change over every other piece.

    Pieces whose answer is the edit's new target (the same-answer rule) rise by tens of nats for
    that reason alone, which has nothing to do with coupling: they are measured and reported as
    their own group ("target-answer pieces") and left out of the correlations.

    Returns the edit's record, one measurement per other piece, and (coupling prediction,
    first-order prediction, measured) over the other non-target-answer pieces, for the pooled statistics.
    """
    i, piece = edit.index, r.pieces[edit.index]
    measured = applied.after - r.before
    pred_f = first_order(r.reader, applied.deltas)
    pred_c = float(pred_f[i]) * r.cos[i] * r.norms / r.norms[i].clamp_min(1e-300)
    target = {j for j, p in enumerate(r.pieces) if j != i and same_answer(p.answer, edit.new_answer)}
    others = [j for j in range(len(r.pieces)) if j != i and j not in target]
    same = [same_question(piece.question_ids, r.pieces[j].question_ids) for j in range(len(r.pieces))]
    o = torch.tensor(others, dtype=torch.long)
    m, pc, pf = measured[o], pred_c[o], pred_f[o]
    same_js = [j for j in others if same[j]]
    cross_js = [j for j in others if not same[j]]
    rec = EditRecord(
        edit=e, piece_id=piece.id, question_id=piece.question_id, kind=piece.kind.value, prompt=applied.prompt,
        answer=piece.answer, new_answer=edit.new_answer.strip(), counterfactual_source=edit.source,
        logprob_true_before=float(r.before[i]), logprob_true_after=float(applied.after[i]),
        logprob_new_before=applied.new_before, logprob_new_after=applied.new_after,
        success=applied.new_after > float(applied.after[i]), already_satisfied=applied.new_before > float(r.before[i]),
        edit_norm=edit_norm(applied.deltas),
        first_order_self=float(pred_f[i]), spearman_coupling=spearman(pc, m), spearman_first_order=spearman(pf, m),
        pearson_first_order=pearson(pf, m), precision_at_k=precision_at_k(pc, m, r.cfg.ripple.top_k),
        k=min(r.cfg.ripple.top_k, len(others)),
        mean_abs_measured_same_question=float(measured[same_js].abs().mean()) if same_js else None,
        mean_abs_measured_cross_question=float(measured[cross_js].abs().mean()) if cross_js else None,
        multi_hop_measured=[float(measured[j]) for j in same_js if r.pieces[j].kind == PieceKind.multi_hop],
        target_answer_pieces=len(target),
        target_answer_mean_rise=float(measured[sorted(target)].mean()) if target else None,
        restored=applied.restored, seconds=seconds)
    rows = [Measurement(edit=e, edited_id=piece.id, piece_id=r.pieces[j].id, same_question=same[j],
                        target_answer=j in target, cosine=float(r.cos[i, j]), predicted_coupling=float(pred_c[j]),
                        predicted_first_order=float(pred_f[j]), measured=float(measured[j]))
            for j in sorted([*others, *target])]
    return rec, rows, (pc, pf, m)


def summarise(r: RippleRun, records: list[EditRecord], pooled: list[tuple[torch.Tensor, ...]], seconds: float) -> RippleSummary:
    """The summary over edits: mean per-edit metrics with bootstrap intervals, their spread, pooled correlations."""
    pc, pf, pm = (torch.cat([p[k] for p in pooled]) for k in range(3))
    ok = [x for x in records if x.success]
    manifest_lp = torch.tensor([p.logprob for p in r.manifest.records()], dtype=torch.float64)
    used = ("GradSim", "ripple effect", "coupling prediction", "first-order prediction", "edit success", "describe",
            "Spearman's rho", "Pearson r", "precision@k", "bootstrap interval", "same question", "answer match")
    return RippleSummary(
        inputs=r.inputs(r.method), method=r.method.name, hparams=r.method.settings(), n_edits=len(records),
        n_successful=len(ok), seconds=seconds, device=device_info(r.loaded.device),
        spearman_coupling=bootstrap_interval([x.spearman_coupling for x in records]),
        spearman_first_order=bootstrap_interval([x.spearman_first_order for x in records]),
        spearman_coupling_successful=bootstrap_interval([x.spearman_coupling for x in ok]),
        precision_at_k=bootstrap_interval([x.precision_at_k for x in records]),
        per_edit={k: describe([getattr(x, k) for x in records]) for k in PER_EDIT},
        pooled=PooledRipple(spearman_coupling=spearman(pc, pm), spearman_first_order=spearman(pf, pm),
                            pearson_first_order=pearson(pf, pm), n_points=int(pm.numel())),
        baseline_logprob_max_abs_diff_vs_manifest=float((r.before - manifest_lp).abs().max()),
        definitions={k: DEFINITIONS[k] for k in used}, edits=records)


def edit_mode(cfg: RunConfig, pieces: list[KnowledgePiece]) -> str:
    """'benchmark' or 'pieces': ``ripple.edits``, with 'auto' meaning benchmark when the pieces carry edits.

    Raises:
        NothingToEdit: benchmark mode asked for, but no piece is a benchmark edit.
    """
    has = any(p.role == PieceRole.edit for p in pieces)
    if cfg.ripple.edits == "benchmark" and not has:
        raise NothingToEdit("--edits benchmark: no piece carries a benchmark edit (role 'edit'); download RippleEdits or "
                            "MQuAKE pieces, or use --edits pieces.")
    return "benchmark" if cfg.ripple.edits == "benchmark" or (cfg.ripple.edits == "auto" and has) else "pieces"


def _fewer(asked: int, made: int, why: str) -> None:
    if made < asked:
        log.warning(f"--n-edits {asked}: {why}, so {made} edit{'s are' if made != 1 else ' is'} made.")


@locked("ripple")
def ripple(cfg: RunConfig, run_dir: str | Path, *, loaded: Optional[LoadedModel] = None, show_progress: bool = True) -> RippleResult:
    """Make ``ripple.n_edits`` edits one at a time and measure their ripple effect.

    Benchmark mode (:mod:`gradcouple.benchmark`) makes the edits the pieces carry and writes
    ``ripple/tests.jsonl``; pieces mode edits pieces toward counterfactuals and writes
    ``ripple/edits.jsonl`` (one line per edit and other piece). Both write ``ripple/summary.json``.

    Raises:
        ArtifactError: gradients or coupling missing or stale; the model differs from the extraction's.
        NothingToEdit: no piece can be edited.
    """
    t0 = time.perf_counter()
    use_threads(cfg.model.threads)
    r = check_run(cfg, run_dir, loaded, prepare=not cfg.ripple.layer_sweep)
    out = r.results()  # beside the results of every other method and setting
    if edit_mode(cfg, r.pieces) == "benchmark":
        edits = benchmark_edits(r.pieces)[: cfg.ripple.n_edits]
        if not edits:
            raise NothingToEdit(f"{r.run.pieces_path}: no benchmark edit has a test query.")
        _fewer(cfg.ripple.n_edits, len(edits), f"the pieces in {r.run.root} carry {len(edits)} benchmark edits with "
                                                f"test queries")
        if cfg.ripple.layer_sweep:
            lsw = layer_sweep(r, edits, cfg.ripple.layer_sweep, show_progress)
            out.save_layer_sweep(lsw)
            return RippleResult(out_dir=out.dir, results=out.name, path=out.layer_sweep_path, summary=None, layer_sweep=lsw)
        if cfg.ripple.sweep:
            sweep = sweep_benchmark(r, edits, cfg.ripple.sweep, cfg.ripple.sweep_knob, show_progress)
            out.save_sweep(sweep)
            return RippleResult(out_dir=out.dir, results=out.name, path=out.sweep_path, summary=None, sweep=sweep)
        summary, rows = evaluate_benchmark(r, r.method, edits, show_progress)
        out.save(summary, rows)
        return RippleResult(out_dir=out.dir, results=out.name, path=out.summary_path, summary=summary)
    planned = choose_edits(r.pieces, cfg.ripple.n_edits, cfg.ripple.seed)
    if not planned:
        raise NothingToEdit(f"{r.run.pieces_path}: no piece can be edited (need a counterfactual or two distinct answers of one kind).")
    _fewer(cfg.ripple.n_edits, len(planned), f"{len(planned)} pieces in {r.run.root} can be edited")

    def make(e: int) -> dict:
        te = time.perf_counter()
        applied = apply_edit(r, r.method, planned[e])
        rec, rows, points = record_edit(r, e, planned[e], applied, time.perf_counter() - te)
        return {"record": rec.model_dump(mode="json"), "rows": [m.model_dump(mode="json") for m in rows],
                "points": [x.tolist() for x in points]}

    keys = [f"{r.pieces[e.index].id}->{e.new_answer}" for e in planned]
    with r.executing(lowest_block(r.method.touched(r.targets))), \
            progress("ripple", len(planned), "edits", show_progress) as advance:
        r.before = measure_logprobs(r.loaded.model, r.encoded, r.manifest.batch_size, r.loaded.pad_id)
        done, resumed = out.journal(r.inputs(r.method)).each(keys, make, advance)
    records = [EditRecord.model_validate(d["record"]) for d in done]
    rows = [Measurement.model_validate(m) for d in done for m in d["rows"]]
    pooled = [tuple(torch.tensor(x, dtype=torch.float64) for x in d["points"]) for d in done]
    summary = summarise(r, records, pooled, time.perf_counter() - t0)
    summary.resumed_edits = resumed
    out.save(summary, rows)
    return RippleResult(out_dir=out.dir, results=out.name, path=out.summary_path, summary=summary)
