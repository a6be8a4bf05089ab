"""Benchmark edits: the edits and test queries that RippleEdits and MQuAKE pieces carry, made for
real, with every predictor scored against the measured ripple.

An edit is the set of ``edit`` pieces of one question (one for RippleEdits, one per requested
rewrite for an MQuAKE case, applied together); its ``original`` pieces hold the true answers and
its ``test`` pieces the queries whose answers should change. Per edit: make it (fine-tuning or ROME),
measure every test query's log-probability of its post-edit answer and whether it is the greedy
continuation, restore the weights bit for bit. Failed edits (the new target not more likely than
the true one afterwards) are reported and left out of the predictor statistics, as RippleEdits
does.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..artifacts import (
    BenchmarkEditRecord,
    BenchmarkSummary,
    EditMetrics,
    LayerSweepPoint,
    LayerSweepSummary,
    ExactMatch,
    PredictorReport,
    PredictorScore,
    RetentionPoint,
    SweepPoint,
    SweepSummary,
    TestMeasurement,
)
from ..edits import EditMethod, Rewrite, edit_norm, edited, restored
from ..errors import ConfigError
from ..gram import first_order
from ..layers import find_blocks, parse_block_spec, select_targets
from ..keys import keys_at, ridged
from ..metrics import (
    DEFINITIONS,
    Interval,
    auroc,
    bootstrap_interval,
    clustered_correlation,
    describe,
    locality,
    spearman,
    token_accuracy,
)
from ..pieces import KnowledgePiece, PieceRole
from ..predictors import PREDICTORS, PredictorContext, predict
from ..progress import progress
from ..rules import RULES, same_answer
from ..runinfo import device_info
from ..scoring import EncodedPiece, answer_argmax, encode, is_greedy, measure_answers, measure_logprobs, subject_position
from ..suffix import lowest_block
from .edit_run import RippleRun

log = logging.getLogger(__name__)

MAX_ALIASES = 3
UNRELATED_SAMPLE = 100
#: sequences per no-grad scoring batch (length-sorted, so padding stays small)
MEASURE_BATCH = 32
#: test criteria that rephrase the edited fact: what generalisation is over
REPHRASING_CRITERIA = ("Subject_Aliasing", "paraphrase")


@dataclass
class BenchmarkEdit:
    """Rows (pieces.jsonl indices) of one edit: its edit pieces (new targets), originals (true
    targets), tests, and each test's condition row (None when it has none)."""

    question_id: str
    edits: list[int]
    originals: list[int]
    tests: list[int]
    conditions: list[Optional[int]]


def benchmark_edits(pieces: list[KnowledgePiece], with_untested: bool = False) -> list[BenchmarkEdit]:
    """Group the pieces' benchmark structure into edits, in file order: the ``edit`` pieces of one
    question id are one edit, with the originals, tests and conditions linked to them by ``edit_id``
    (one pass over the pieces). Edits without tests are dropped unless ``with_untested``."""
    by_id = {p.id: i for i, p in enumerate(pieces)}
    groups: dict[str, list[int]] = {}
    linked: dict[str, dict[PieceRole, list[int]]] = {}
    for i, p in enumerate(pieces):
        if p.role == PieceRole.edit:
            groups.setdefault(p.question_id, []).append(i)
        elif p.role in (PieceRole.original, PieceRole.test) and p.edit_id:
            linked.setdefault(p.edit_id, {}).setdefault(p.role, []).append(i)
    out = []
    for qid, rows in groups.items():
        of = [linked.get(pieces[r].id, {}) for r in rows]
        originals = sorted(i for d in of for i in d.get(PieceRole.original, []))
        tests = sorted(i for d in of for i in d.get(PieceRole.test, []))
        if tests or with_untested:
            out.append(BenchmarkEdit(qid, rows, originals, tests,
                                     [by_id.get(pieces[t].condition_id) if pieces[t].condition_id else None for t in tests]))
    return out


def edit_succeeded(pieces: list[KnowledgePiece], edit: BenchmarkEdit, before: torch.Tensor, after: torch.Tensor) -> bool:
    """``DEFINITIONS['edit success']`` for every rewrite of the edit: afterwards its new target is more
    likely than its original (true) answer; a rewrite without an original piece must rise."""
    original_of = {pieces[o].edit_id: o for o in edit.originals}
    return all(after[i] > after[original_of[pieces[i].id]] if pieces[i].id in original_of else after[i] > before[i]
               for i in edit.edits)


def same_target(pieces: list[KnowledgePiece], edit: BenchmarkEdit) -> bool:
    """``DEFINITIONS['same target']``: every rewrite's new answer is its true answer (same-answer rule)."""
    true_of = {pieces[o].edit_id: pieces[o].answer for o in edit.originals}
    return all(pieces[i].id in true_of and same_answer(pieces[i].answer, true_of[pieces[i].id]) for i in edit.edits)


def counted(pieces: list[KnowledgePiece], edit: BenchmarkEdit, before: torch.Tensor) -> bool:
    """Whether efficacy counts the edit: neither already satisfied nor of the same target."""
    return not (edit_already_satisfied(pieces, edit, before) or same_target(pieces, edit))


def edit_already_satisfied(pieces: list[KnowledgePiece], edit: BenchmarkEdit, before: torch.Tensor) -> bool:
    """``DEFINITIONS['already satisfied']``: before the edit every rewrite's new target was more likely
    than its true one (False for a rewrite without a true answer)."""
    original_of = {pieces[o].edit_id: o for o in edit.originals}
    return all(pieces[i].id in original_of and before[i] > before[original_of[pieces[i].id]] for i in edit.edits)


def _variants(tokenizer, template: str, max_length: int, piece: KnowledgePiece) -> list[EncodedPiece]:
    """The piece's scored answer and up to MAX_ALIASES aliases, each as an encoded piece."""
    out = []
    for ans in [piece.answer, *piece.aliases[:MAX_ALIASES]]:
        prompt, answer = piece.render_answer(ans, template)
        try:
            out.append(encode(tokenizer, prompt, answer, max_length))
        except Exception:  # noqa: BLE001 (an alias that does not tokenize is simply not tried)
            continue
    return out


def greedy_matches(model, groups: list[list[EncodedPiece]], pad_id: int, batch_size: int = 32) -> list[bool]:
    """Per group: whether the greedy continuation of the prompt begins with any of its answers
    (``RULES['exact match']``), all groups' answers scored together in length-sorted batches."""
    flat = [e for es in groups for e in es]
    _, top = measure_answers(model, flat, batch_size, pad_id)
    hit, k = [], 0
    for es in groups:
        hit.append(any(is_greedy(e, t) for e, t in zip(es, top[k:k + len(es)])))
        k += len(es)
    return hit


def _finite(x) -> Optional[float]:
    x = float(x)
    return x if np.isfinite(x) else None


def _score_set(records: list[TestMeasurement], name: str, clusters: list[int], other_scores, n_resamples: int) -> PredictorScore:
    x = [np.nan if r.predictors[name] is None else r.predictors[name] for r in records]
    y = [r.rise for r in records]
    own, labels = other_scores
    return PredictorScore(pearson=clustered_correlation(x, y, clusters, "pearson", n_resamples),
                          spearman=clustered_correlation(x, y, clusters, "spearman", n_resamples),
                          auroc=auroc(own, labels), within_edit_spearman=within_edit_spearman(records, name))


def within_edit_spearman(records: list[TestMeasurement], name: str) -> Interval:
    """Mean over edits of Spearman's rho between predictor ``name`` and the measured rise of the edit's tests
    (an edit whose rho is undefined, fewer than 3 scored tests or constant, is left out), with its bootstrap
    interval (``DEFINITIONS['bootstrap interval']``)."""
    within: dict[int, tuple[list, list]] = {}
    for r in records:
        within.setdefault(r.edit, ([], []))
        if r.predictors.get(name) is not None:
            within[r.edit][0].append(r.predictors[name]), within[r.edit][1].append(r.rise)
    rhos = [spearman(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)) for a, b in within.values()]
    return bootstrap_interval(rhos)


def predictor_reports(tests: list[TestMeasurement], auroc_points: dict[str, tuple[list, list, list]],
                      n_resamples: int) -> dict[str, PredictorReport]:
    """Per predictor: pooled, per criterion, and pooled over tests whose condition the model knew."""
    ok = [t for t in tests if t.edit_success]
    criteria = sorted({t.criterion for t in ok})
    out = {}
    for name in PREDICTORS:
        scores, labels, kinds = auroc_points[name]

        def subset(rows, crit=None, known_only=False):
            sel = [k for k, (c, known) in enumerate(kinds) if (crit is None or c == crit) and (known or not known_only)]
            return _score_set(rows, name, [r.edit for r in rows], ([scores[k] for k in sel], [labels[k] for k in sel]),
                              n_resamples)

        known = [t for t in ok if t.condition_known is not False]
        out[name] = PredictorReport(
            definition=PREDICTORS[name][1], pooled=subset(ok),
            criteria={c: subset([t for t in ok if t.criterion == c], c) for c in criteria},
            pooled_condition_known=subset(known, known_only=True))
    return out


class BenchmarkRun:
    """The unedited model's view of a run's benchmark edits: encodings, keys, covariance, predictor context."""

    def __init__(self, r: RippleRun, edits: list[BenchmarkEdit]):
        self.r, self.edits = r, edits
        tok, cfg, man = r.loaded.tokenizer, r.cfg.ripple, r.manifest
        self.template, self.max_length = r.template, r.max_length
        self.layer = r.method.key_target(r.targets)
        # keys at the edit subject's last token, in the edit and in its tests (ROME's key position),
        # else at the last prompt token
        positions = [e.answer_start - 1 for e in r.encoded]
        for edit in edits:
            subj = next((r.pieces[i].triple.subject for i in edit.edits if r.pieces[i].triple), None)
            for i in (*edit.edits, *edit.tests):
                pos = subject_position(tok, r.encoded[i], subj) if subj else None
                positions[i] = pos if pos is not None else positions[i]
        self.positions = positions
        keys = keys_at(r.loaded.model, self.layer, r.encoded, positions, r.loaded.pad_id, man.batch_size)
        self.cov, self.cov_source = r.covariance(self.layer)
        gram = r.run.coupling.load_gram()
        self.ctx = PredictorContext(gram=gram, keys=keys, cinv_keys=torch.linalg.solve(ridged(self.cov), keys.t()).t(), seed=cfg.seed)
        all_tests = sorted({t for e in edits for t in e.tests})
        rng = np.random.default_rng(cfg.seed)
        self.unrelated_pool = sorted(rng.choice(all_tests, size=min(UNRELATED_SAMPLE, len(all_tests)), replace=False).tolist())
        self.variants = {t: _variants(tok, self.template, self.max_length, r.pieces[t]) for e in edits for t in e.tests}
        conds = sorted({c for e in edits for c in e.conditions if c is not None})
        known = greedy_matches(r.loaded.model, [_variants(tok, self.template, self.max_length, r.pieces[c]) for c in conds],
                               r.loaded.pad_id)
        self.condition_known = dict(zip(conds, known))
        self.condition_row = {t: c for e in edits for t, c in zip(e.tests, e.conditions)}
        self.greedy_before = dict(zip(self.variants, greedy_matches(r.loaded.model, list(self.variants.values()), r.loaded.pad_id)))
        tests = sorted(self.variants)
        self.argmax_before = dict(zip(tests, answer_argmax(r.loaded.model, [r.encoded[t] for t in tests], man.batch_size,
                                                           r.loaded.pad_id)))

    def test_condition_known(self, test: int) -> bool:
        """Whether the unedited model knew the test's condition fact (True for tests without one)."""
        c = self.r.pieces[test].condition_id
        row = self.condition_row.get(test)
        return True if c is None or row is None else bool(self.condition_known.get(row, True))

    def logprobs(self, rows: list[int]) -> torch.Tensor:
        """log P (nats) of the pieces ``rows`` on the model as it is now: (N,) float64, NaN elsewhere."""
        out = torch.full((len(self.r.pieces),), float("nan"), dtype=torch.float64)
        rows = sorted(set(rows))
        out[torch.tensor(rows, dtype=torch.long)] = measure_logprobs(
            self.r.loaded.model, [self.r.encoded[i] for i in rows], MEASURE_BATCH, self.r.loaded.pad_id)
        return out

    def rewrites(self, edit: BenchmarkEdit) -> list[Rewrite]:
        """The edit's rewrites: each new target with its subject's key position."""
        return [Rewrite(self.r.encoded[i], self.positions[i], p.triple.subject if p.triple else None)
                for i, p in ((i, self.r.pieces[i]) for i in edit.edits)]


def edit_batches(n_edits: int, batch_size: int) -> list[list[int]]:
    """Consecutive groups of ``batch_size`` edit indices (the last may be shorter)."""
    return [list(range(a, min(n_edits, a + batch_size))) for a in range(0, n_edits, batch_size)]


def evaluate_benchmark(r: RippleRun, method: EditMethod, edits: list[BenchmarkEdit], show_progress: bool = True,
                       b: Optional[BenchmarkRun] = None) -> tuple[BenchmarkSummary, list[TestMeasurement]]:
    """Make every edit with ``method``, measure its tests, score every predictor.

    Edits are made in batches of ``ripple.batch_size`` (the rewrites of a batch in one ``apply``),
    each measured on the model its batch left. The weights are restored after each batch, or, with
    ``ripple.sequential``, only at the end: then after each batch every earlier edit is measured
    again (:class:`~gradcouple.artifacts.RetentionPoint`).

    Each finished batch goes to the run's journal (:class:`gradcouple.rundir.EditJournal`), so an
    interrupted call resumes: batches found there are read back, not measured again (in a sequence
    they are made again, unmeasured, so that later batches see them).
    ``b`` reuses the unedited model's keys, covariance and predictor context of an earlier call.
    """
    t0 = time.perf_counter()
    with r.executing(lowest_block(method.touched(r.targets))) as sx:
        start = sx.stats.model_copy()
        summary, tests = _evaluate(r, method, edits, show_progress, b, t0)
    summary.suffix = sx.stats.since(start)
    return summary, tests


def _evaluate(r: RippleRun, method: EditMethod, edits: list[BenchmarkEdit], show_progress: bool,
              b: Optional[BenchmarkRun], t0: float) -> tuple[BenchmarkSummary, list[TestMeasurement]]:
    rc = r.cfg.ripple
    b = b or BenchmarkRun(r, edits)
    before = b.logprobs([i for e in edits for i in (*e.tests, *e.edits, *e.originals)])
    all_tests = torch.tensor(sorted({t for e in edits for t in e.tests}), dtype=torch.long)
    test_edit = {t: k for k, e in enumerate(edits) for t in e.tests}
    groups = edit_batches(len(edits), rc.batch_size)
    keys = ["|".join(",".join(r.pieces[i].id for i in edits[k].edits) for k in g) for g in groups]
    made = [0]  # batches applied to the model so far (a sequence replays the ones read back)
    ctx = r.context()

    def make(g: int) -> dict:
        te = time.perf_counter()
        if not rc.sequential:
            with edited(method, ctx, [rw for k in groups[g] for rw in b.rewrites(edits[k])]) as deltas:
                return _measure_batch(r, b, edits, groups[g], deltas, before, all_tests, test_edit, te)
        for earlier in groups[made[0]:g]:
            method.apply(ctx, [rw for k in earlier for rw in b.rewrites(edits[k])])
        te = time.perf_counter()
        deltas = method.apply(ctx, [rw for k in groups[g] for rw in b.rewrites(edits[k])])
        made[0] = g + 1
        out = _measure_batch(r, b, edits, groups[g], deltas, before, all_tests, test_edit, te)
        out["retention"] = _retention(r, b, edits, groups[g][-1] + 1, before)
        return out

    with progress("ripple", len(groups), "batches" if rc.batch_size > 1 else "edits", show_progress) as advance:
        if rc.sequential:
            method.check(ctx.targets)
            try:
                with restored(method.touched(ctx.targets)):
                    done, resumed = r.results().journal(r.inputs(method)).each(keys, make, advance)
            finally:
                method.reset()
        else:
            done, resumed = r.results().journal(r.inputs(method)).each(keys, make, advance)
    per_edit = [e for d in done for e in d["edits"]]
    records = [BenchmarkEditRecord.model_validate(d["record"]) for d in per_edit]
    tests = [TestMeasurement.model_validate(t) for d in per_edit for t in d["tests"]]
    auroc_points: dict[str, tuple[list, list, list]] = {name: ([], [], []) for name in PREDICTORS}
    for d in per_edit:
        for name, pts in d["auroc"].items():
            for acc, new in zip(auroc_points[name], pts):
                acc.extend(tuple(x) if isinstance(x, list) else x for x in new)
    unrelated = [x for d in per_edit for x in d["unrelated"]]
    local = [x for d in per_edit for x in d["locality"]]
    summary = _summary(r, method, b, records, tests, auroc_points, unrelated, local, time.perf_counter() - t0)
    summary.retention = [RetentionPoint.model_validate(d["retention"]) for d in done if d.get("retention")]
    summary.resumed_edits = sum(len(groups[g]) for g in range(resumed))
    return summary, tests


def _retention(r: RippleRun, b: BenchmarkRun, edits: list[BenchmarkEdit], n_made: int, before: torch.Tensor) -> dict:
    """In a sequence, after ``n_made`` edits: how many of them still succeed, and the exact match of
    their test queries (``RetentionPoint``), measured on the model as it is now."""
    made = edits[:n_made]
    now = b.logprobs([i for e in made for i in (*e.edits, *e.originals)])
    tests = [t for e in made for t in e.tests]
    greedy = greedy_matches(r.loaded.model, [b.variants[t] for t in tests], r.loaded.pad_id)
    kept = [e for e in made if counted(r.pieces, e, before)]
    return RetentionPoint(n_edits_made=n_made, n_counted=len(kept),
                          efficacy=(sum(edit_succeeded(r.pieces, e, before, now) for e in kept) / len(kept)
                                    if kept else None),
                          exact_match_tests=float(np.mean(greedy)) if greedy else None).model_dump(mode="json")


def _measure_batch(r: RippleRun, b: BenchmarkRun, edits: list[BenchmarkEdit], group: list[int],
                   deltas: dict[str, torch.Tensor], before: torch.Tensor, all_tests: torch.Tensor,
                   test_edit: dict[int, int], t_edit: float) -> dict:
    """Measure the edits ``group`` on the model their batch left (weights not yet restored): per edit
    its record, test measurements, AUROC points and unrelated changes as JSON-ready lists.
    ``t_edit``: when the batch's edit began (``time.perf_counter``), for the per-phase seconds."""
    te = time.perf_counter()
    edit_seconds = (te - t_edit) / len(group)
    mine = set(group)
    others = [t for t in b.unrelated_pool if test_edit[t] not in mine]
    rows = [i for k in group for i in (*edits[k].tests, *edits[k].edits, *edits[k].originals)]
    tests = [t for k in group for t in edits[k].tests]
    # one scoring pass over everything measured: log-probs, argmax tokens (locality) and greedy checks
    scored = [*dict.fromkeys([*rows, *others])]
    variants = [e for t in tests for e in b.variants[t]]
    lp, top = measure_answers(r.loaded.model, [*(r.encoded[i] for i in scored), *variants], MEASURE_BATCH,
                              r.loaded.pad_id)
    after = torch.full((len(r.pieces),), float("nan"), dtype=torch.float64)
    after[torch.tensor(scored, dtype=torch.long)] = lp[:len(scored)]
    argmax_after = dict(zip(scored, top[:len(scored)]))
    greedy_after, k = {}, len(scored)
    for t in tests:
        n = len(b.variants[t])
        greedy_after[t] = any(is_greedy(e, a) for e, a in zip(b.variants[t], top[k:k + n]))
        k += n
    measure_seconds = (time.perf_counter() - te) / len(group)
    out = []
    for k in group:
        tp = time.perf_counter()
        payload = _edit_payload(r, b, k, edits[k], deltas, before, after, greedy_after, argmax_after, others,
                                all_tests, test_edit, batch=group[0], seconds=measure_seconds)
        phases = {"edit": edit_seconds, "measure": measure_seconds, "predictors": time.perf_counter() - tp}
        payload["record"]["phases"] = phases
        payload["record"]["seconds"] = sum(phases.values())
        out.append(payload)
    return {"edits": out}


def _edit_payload(r: RippleRun, b: BenchmarkRun, k: int, edit: BenchmarkEdit, deltas: dict[str, torch.Tensor],
                  before: torch.Tensor, after: torch.Tensor, greedy_after: dict, argmax_after: dict, others: list[int],
                  all_tests: torch.Tensor, test_edit: dict[int, int], batch: int, seconds: float) -> dict:
    """Edit ``k`` measured: its record, test measurements, AUROC points, unrelated changes and locality."""
    ctx = dataclasses.replace(b.ctx, first_order=first_order(r.reader, deltas, rows=all_tests.tolist()), logprobs=before)
    success = edit_succeeded(r.pieces, edit, before, after)
    already = edit_already_satisfied(r.pieces, edit, before)
    own = torch.tensor(edit.tests, dtype=torch.long)
    preds = predict(ctx, edit.edits, edit.originals, all_tests)  # every edit's tests: AUROC
    own_preds = predict(ctx, edit.edits, edit.originals, own)     # the edit's own tests: correlations
    auroc, unrelated, local = {}, [], []
    if success:
        for name, v in preds.items():
            auroc[name] = (v.tolist(), [test_edit[t] == k for t in all_tests.tolist()],
                           [(r.pieces[t].criterion or "test", b.test_condition_known(t)) for t in all_tests.tolist()])
        unrelated = (after[others] - before[others]).tolist()
        local = [locality(b.argmax_before[t], argmax_after[t]) for t in others]
    tests = []
    for j, t in enumerate(edit.tests):
        c = edit.conditions[j]
        answer = r.encoded[t].ids[r.encoded[t].answer_start:]
        tests.append(TestMeasurement(
            edit=k, edit_id=r.pieces[edit.edits[0]].id, test_id=r.pieces[t].id, criterion=r.pieces[t].criterion or "test",
            logprob_before=float(before[t]), logprob_after=float(after[t]), rise=float(after[t] - before[t]),
            greedy_before=b.greedy_before[t], greedy_after=greedy_after[t],
            condition_known=b.condition_known.get(c) if c is not None else None, edit_success=success,
            token_accuracy_before=token_accuracy(b.argmax_before[t], answer),
            token_accuracy_after=token_accuracy(argmax_after[t], answer),
            predictors={n: _finite(v[j]) for n, v in own_preds.items()}))
    e0 = r.pieces[edit.edits[0]]
    record = BenchmarkEditRecord(
        edit=k, batch=batch, edit_ids=[r.pieces[i].id for i in edit.edits], question_id=edit.question_id,
        subject=e0.triple.subject if e0.triple else None, new_target=e0.answer, true_target=e0.answer_before,
        success=success, already_satisfied=already, same_target=same_target(r.pieces, edit),
        logprob_new_before=float(before[edit.edits].sum()),
        logprob_new_after=float(after[edit.edits].sum()),
        logprob_true_before=float(before[edit.originals].sum()) if edit.originals else None,
        logprob_true_after=float(after[edit.originals].sum()) if edit.originals else None,
        subject_key_found=all(b.positions[i] != r.encoded[i].answer_start - 1 for i in edit.edits),
        edit_norm=edit_norm(deltas), n_tests=len(edit.tests), mean_rise_own_tests=float((after[own] - before[own]).mean()),
        restored=True, seconds=seconds)
    return {"record": record.model_dump(mode="json"), "tests": [t.model_dump(mode="json") for t in tests],
            "auroc": auroc, "unrelated": unrelated, "locality": local}


def edit_metrics(records: list[BenchmarkEditRecord], tests: list[TestMeasurement], unrelated: list[float],
                 local: list[float]) -> EditMetrics:
    """Efficacy, generalisation, specificity, locality and portability of a set of edits, each as
    ``DEFINITIONS`` defines it under that name."""
    counted_ = [e for e in records if not (e.already_satisfied or e.same_target)]
    ok = [t for t in tests if t.edit_success]
    rephrase = [t for t in ok if t.criterion in REPHRASING_CRITERIA]
    by: dict[str, list[TestMeasurement]] = {"pooled": ok}
    for t in ok:
        by.setdefault(t.criterion, []).append(t)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return float(np.mean(xs)) if xs else None

    return EditMetrics(
        n_edits=len(records), n_already_satisfied=sum(e.already_satisfied for e in records),
        n_same_target=sum(e.same_target and not e.already_satisfied for e in records), n_counted=len(counted_),
        n_successful_counted=sum(e.success for e in counted_),
        efficacy=sum(e.success for e in counted_) / len(counted_) if counted_ else None,
        efficacy_magnitude=describe([e.logprob_new_after - e.logprob_new_before for e in counted_]),
        generalisation=mean([t.greedy_after for t in rephrase]), n_rephrasings=len(rephrase),
        specificity=describe(unrelated), locality=describe(local),
        portability={c: mean([t.token_accuracy_after for t in ts]) for c, ts in sorted(by.items())},
        exact_match_after={c: mean([t.greedy_after for t in ts]) for c, ts in sorted(by.items())})


def _summary(r: RippleRun, method: EditMethod, b: BenchmarkRun, records, tests, auroc_points, unrelated, local,
             seconds) -> BenchmarkSummary:
    ok = [t for t in tests if t.edit_success]
    em = {}
    for c in sorted({t.criterion for t in ok}) + ["pooled"]:
        sel = [t for t in ok if c == "pooled" or t.criterion == c]
        em[c] = ExactMatch(n=len(sel), before=float(np.mean([t.greedy_before for t in sel])) if sel else None,
                           after=float(np.mean([t.greedy_after for t in sel])) if sel else None)
    mh = [t.greedy_after for t in tests if t.criterion == "multi_hop"]
    used = ("GradSim", "ripple effect", "first-order prediction", "edit success", "describe", "Spearman's rho",
            "Pearson r", "bootstrap interval", "clustered bootstrap interval", "AUROC", "exact match", "multi-hop accuracy",
            "condition known", "answer match", "already satisfied", "same target", "efficacy", "efficacy magnitude", "generalisation",
            "specificity", "locality", "teacher-forced token accuracy", "portability")
    return BenchmarkSummary(
        inputs=r.inputs(method), method=method.name, hparams=method.settings(),
        settings=r.cfg.ripple.model_dump(mode="json", exclude={"hparams"}), layer=b.layer.name, covariance=b.cov_source,
        n_edits=len(records), n_successful=sum(e.success for e in records), n_tests=len(tests), n_tests_counted=len(ok),
        exact_match=em, multi_hop_accuracy=float(np.mean(mh)) if mh else None,
        unrelated_change=describe(unrelated), metrics=edit_metrics(records, tests, unrelated, local),
        method_source=method.source, predictors=predictor_reports(tests, auroc_points, r.cfg.ripple.bootstrap_resamples),
        definitions={k: DEFINITIONS[k] for k in used if k in DEFINITIONS} | {k: RULES[k] for k in used if k in RULES},
        seconds=seconds, device=device_info(r.loaded.device), edits=records)


def sweep_benchmark(r: RippleRun, edits: list[BenchmarkEdit], strengths: list[float], knob: Optional[str] = None,
                    show_progress: bool = True) -> SweepSummary:
    """The same edits at each value of ``knob`` (None: the method's strength knob, ft ``lr``, rome
    ``clamp_norm_factor``): per value, efficacy (mean rise of an edit's own tests), specificity
    (change of other edits' tests) and every predictor's pooled Spearman and Pearson with their
    intervals. A value at which no edit succeeds is warned about (logged): it often means another
    knob was meant.

    Raises:
        ConfigError: ``knob`` is not a knob of the run's edit method.
    """
    t0 = time.perf_counter()
    knob = r.method.knob_named(knob)
    flag = r.method.knobs()[knob]
    log.info(f"sweep: {knob}{f' ({flag})' if flag else ''} of {r.method.name} edits at "
             f"{', '.join(f'{v:g}' for v in strengths)}.")
    with r.executing(lowest_block(r.method.touched(r.targets))):
        points = _sweep_points(r, edits, knob, strengths, show_progress)
    return SweepSummary(inputs=r.inputs(r.method), method=r.method.name, knob=knob, points=points,
                        seconds=time.perf_counter() - t0)


def _sweep_points(r: RippleRun, edits: list[BenchmarkEdit], knob: str, strengths: list[float],
                  show_progress: bool) -> list[SweepPoint]:
    b = BenchmarkRun(r, edits)
    points = []
    for strength in strengths:
        s, _ = evaluate_benchmark(r, r.method.with_knob(knob, strength), edits, show_progress, b)
        if s.n_successful == 0:
            log.warning(f"--sweep: at {knob}={strength:g} none of the {s.n_edits} {r.method.name} edits succeeded; "
                        f"check that {knob} is the knob you meant to vary (--sweep KNOB=v1,v2).")
        points.append(SweepPoint(
            strength=strength, n_edits=s.n_edits, n_successful=s.n_successful, metrics=s.metrics,
            mean_rise_own_tests=describe([e.mean_rise_own_tests for e in s.edits]),
            unrelated_change=s.unrelated_change, spearman={n: p.pooled.spearman for n, p in s.predictors.items()},
            pearson={n: p.pooled.pearson for n, p in s.predictors.items()}))
    return points


def layer_sweep(r: RippleRun, edits: list[BenchmarkEdit], spec: str, show_progress: bool = True) -> LayerSweepSummary:
    """The run's method with each block of ``spec`` as its first edited layer (a window as wide as
    its ``layers``): per block, efficacy, efficacy magnitude, specificity and locality over the
    benchmark edits (``DEFINITIONS``). Edits may touch any block: no gradients are read there, so
    the extraction's layers do not limit it. Journalled per (block, edit), so it resumes.

    Raises:
        ConfigError: the method edits no chosen layers (``ft``), or ``spec`` names no block.
    """
    t0 = time.perf_counter()
    method = r.method
    if not method.layered():
        raise ConfigError(f"--layer-sweep: --method {method.name} edits every target layer; sweep a method with "
                          f"--edit-layers (rome, memit, alphaedit, ft-l).")
    model, tok = r.loaded.model, r.loaded.tokenizer
    n_blocks = len(find_blocks(model)[1])
    width = len(method.hp.layers)
    blocks = [L for L in parse_block_spec(spec, n_blocks, "--layer-sweep") if L + width <= n_blocks]
    if not blocks:
        raise ConfigError(f"--layer-sweep {spec}: no block leaves room for {width} edited layers in {n_blocks} blocks.")
    ctx = dataclasses.replace(r.context(), targets=select_targets(model, "all", r.manifest.settings().model.module),
                              reader=None)
    rng = np.random.default_rng(r.cfg.ripple.seed)
    all_tests = sorted({t for e in edits for t in e.tests})
    pool = sorted(rng.choice(all_tests, size=min(UNRELATED_SAMPLE, len(all_tests)), replace=False).tolist())
    test_edit = {t: k for k, e in enumerate(edits) for t in e.tests}
    rows = sorted({i for e in edits for i in (*e.edits, *e.originals)} | set(pool))
    jobs = [(L, k) for L in blocks for k in range(len(edits))]
    methods = {L: method.with_knob("layers", list(range(L, L + width))) for L in blocks}
    if "covariance" in method.needs:  # every window's layers, on the unedited model, before any edit
        r.prefetch(list({t.name: t for L in blocks for t in methods[L].touched(ctx.targets)}.values()))
    suffix = r.executing(min(blocks))
    with suffix:  # before and after on the same path
        before = measure_logprobs(model, [r.encoded[i] for i in rows], MEASURE_BATCH, r.loaded.pad_id)
        argmax_before = dict(zip(pool, answer_argmax(model, [r.encoded[t] for t in pool], MEASURE_BATCH, r.loaded.pad_id)))
    before = torch.full((len(r.pieces),), float("nan"), dtype=torch.float64).index_put_(
        (torch.tensor(rows),), before)

    def rewrites(edit: BenchmarkEdit) -> list[Rewrite]:
        out = []
        for i in edit.edits:
            subj = r.pieces[i].triple.subject if r.pieces[i].triple else None
            out.append(Rewrite(r.encoded[i], subject_position(tok, r.encoded[i], subj) if subj else None, subj))
        return out


    def make(j: int) -> dict:
        L, k = jobs[j]
        edit, te = edits[k], time.perf_counter()
        others = [t for t in pool if test_edit[t] != k]
        mine = [*edit.edits, *edit.originals]
        with edited(methods[L], ctx, rewrites(edit)):
            lp = measure_logprobs(model, [r.encoded[i] for i in [*mine, *others]], r.manifest.batch_size, r.loaded.pad_id)
            top = answer_argmax(model, [r.encoded[t] for t in others], r.manifest.batch_size, r.loaded.pad_id)
        after = before.clone()
        after[torch.tensor([*mine, *others])] = lp
        return {"success": edit_succeeded(r.pieces, edit, before, after),
                "already": edit_already_satisfied(r.pieces, edit, before),
                "same": same_target(r.pieces, edit),
                "rise": float(after[edit.edits].sum() - before[edit.edits].sum()),
                "unrelated": (after[others] - before[others]).tolist(),
                "locality": [locality(argmax_before[t], a) for t, a in zip(others, top)],
                "seconds": time.perf_counter() - te}

    keys = [f"{L}:{','.join(r.pieces[i].id for i in edits[k].edits)}" for L, k in jobs]
    with suffix, progress("layer sweep", len(jobs), "edits", show_progress) as advance:
        done, _ = r.results().journal(r.inputs(method)).each(keys, make, advance)
    points = []
    for L in blocks:
        res = [d for (b, _), d in zip(jobs, done) if b == L]
        kept = [d for d in res if not (d["already"] or d["same"])]
        ok = [d for d in res if d["success"]]
        points.append(LayerSweepPoint(
            layers=methods[L].hp.layers, n_edits=len(res), n_already_satisfied=sum(d["already"] for d in res),
            n_same_target=sum(d["same"] and not d["already"] for d in res),
            n_counted=len(kept), n_successful_counted=sum(d["success"] for d in kept),
            efficacy=sum(d["success"] for d in kept) / len(kept) if kept else None,
            efficacy_magnitude=describe([d["rise"] for d in kept]),
            specificity=describe([x for d in ok for x in d["unrelated"]]),
            locality=describe([x for d in ok for x in d["locality"]]), seconds=sum(d["seconds"] for d in res)))
    used = ("edit success", "already satisfied", "same target", "efficacy", "efficacy magnitude", "specificity", "locality", "describe")
    return LayerSweepSummary(inputs=r.inputs(method), method=method.name, hparams=method.settings(), points=points,
                             definitions={k: DEFINITIONS[k] for k in used}, seconds=time.perf_counter() - t0,
                             device=device_info(r.loaded.device))
