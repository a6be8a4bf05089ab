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
    ExactMatch,
    PredictorReport,
    PredictorScore,
    SweepPoint,
    SweepSummary,
    TestMeasurement,
)
from ..edits import EditMethod, Rewrite, edit_norm, edited
from ..gram import first_order
from ..keys import keys_at
from ..metrics import DEFINITIONS, auroc, bootstrap_interval, clustered_correlation, describe, spearman
from ..pieces import KnowledgePiece, PieceRole
from ..predictors import PREDICTORS, PredictorContext, predict
from ..progress import progress
from ..rules import RULES
from ..runinfo import device_info
from ..scoring import EncodedPiece, collate, encode, measure_logprobs, score, subject_position
from .edit_run import RippleRun

log = logging.getLogger(__name__)

MAX_ALIASES = 3
UNRELATED_SAMPLE = 100


@dataclass
class BenchmarkEdit:
    """Rows (pieces.jsonl indices) of one edit: its edit pieces (new targets), originals (true
    targets), tests, and each test's condition row (None when it has none)."""

    question_id: str
    edits: list[int]
    originals: list[int]
    tests: list[int]
    conditions: list[Optional[int]]


def benchmark_edits(pieces: list[KnowledgePiece]) -> list[BenchmarkEdit]:
    """Group the pieces' benchmark structure into edits, in file order (edits without tests are dropped)."""
    by_id = {p.id: i for i, p in enumerate(pieces)}
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pieces):
        if p.role == PieceRole.edit:
            groups.setdefault(p.question_id, []).append(i)
    out = []
    for qid, rows in groups.items():
        ids = {pieces[r].id for r in rows}
        originals = [i for i, p in enumerate(pieces) if p.role == PieceRole.original and p.edit_id in ids]
        tests = [i for i, p in enumerate(pieces) if p.role == PieceRole.test and p.edit_id in ids]
        if tests:
            out.append(BenchmarkEdit(qid, rows, originals, tests,
                                     [by_id.get(pieces[t].condition_id) if pieces[t].condition_id else None for t in tests]))
    return out


def edit_succeeded(pieces: list[KnowledgePiece], edit: BenchmarkEdit, before: torch.Tensor, after: torch.Tensor) -> bool:
    """``DEFINITIONS['edit success']`` for every rewrite of the edit: afterwards its new target is more
    likely than its original (true) answer; a rewrite without an original piece must rise."""
    original_of = {pieces[o].edit_id: o for o in edit.originals}
    return all(after[i] > after[original_of[pieces[i].id]] if pieces[i].id in original_of else after[i] > before[i]
               for i in edit.edits)


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
    """Per group: whether the greedy continuation of the prompt begins with any of its answers (``RULES['exact match']``)."""
    flat = [(g, e) for g, es in enumerate(groups) for e in es]
    hit = [False] * len(groups)
    device = next(model.parameters()).device
    with torch.no_grad():
        for k in range(0, len(flat), batch_size):
            chunk = flat[k:k + batch_size]
            _, greedy = score(model, collate([e for _, e in chunk], pad_id).to(device))
            for (g, _), ok in zip(chunk, greedy.tolist()):
                hit[g] = hit[g] or ok
    return hit


def _finite(x) -> Optional[float]:
    x = float(x)
    return x if np.isfinite(x) else None


def _score_set(records: list[TestMeasurement], name: str, clusters: list[int], other_scores, n_resamples: int) -> PredictorScore:
    x = [np.nan if r.predictors[name] is None else r.predictors[name] for r in records]
    y = [r.rise for r in records]
    within = {}
    for r in records:
        within.setdefault(r.edit, ([], []))
        if r.predictors[name] is not None:
            within[r.edit][0].append(r.predictors[name]), within[r.edit][1].append(r.rise)
    rhos = [spearman(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)) for a, b in within.values()]
    own, labels = other_scores
    return PredictorScore(pearson=clustered_correlation(x, y, clusters, "pearson", n_resamples),
                          spearman=clustered_correlation(x, y, clusters, "spearman", n_resamples),
                          auroc=auroc(own, labels), within_edit_spearman=bootstrap_interval(rhos))


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
        self.ctx = PredictorContext(gram=gram, keys=keys, cinv_keys=torch.linalg.solve(self.cov, keys.t()).t(), seed=cfg.seed)
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
            self.r.loaded.model, [self.r.encoded[i] for i in rows], self.r.manifest.batch_size, self.r.loaded.pad_id)
        return out

    def rewrites(self, edit: BenchmarkEdit) -> list[Rewrite]:
        """The edit's rewrites: each new target with its subject's key position."""
        return [Rewrite(self.r.encoded[i], self.positions[i]) for i in edit.edits]


def evaluate_benchmark(r: RippleRun, method: EditMethod, edits: list[BenchmarkEdit], show_progress: bool = True,
                       b: Optional[BenchmarkRun] = None) -> tuple[BenchmarkSummary, list[TestMeasurement]]:
    """Make every edit with ``method``, measure its tests, score every predictor; the model is
    restored after each edit.

    Each finished edit goes to the run's journal (:class:`gradcouple.rundir.EditJournal`), so an
    interrupted call resumes: edits found there are read back, not made again.
    ``b`` reuses the unedited model's keys, covariance and predictor context of an earlier call.
    """
    t0 = time.perf_counter()
    b = b or BenchmarkRun(r, edits)
    before = b.logprobs([i for e in edits for i in (*e.tests, *e.edits, *e.originals)])
    all_tests = torch.tensor(sorted({t for e in edits for t in e.tests}), dtype=torch.long)
    test_edit = {t: k for k, e in enumerate(edits) for t in e.tests}
    keys = [",".join(r.pieces[i].id for i in edit.edits) for edit in edits]
    with progress("ripple", len(edits), "edits", show_progress) as advance:
        done, resumed = r.results().journal(r.inputs(method)).each(
            keys, lambda k: _make_and_measure(r, method, b, k, edits[k], before, all_tests, test_edit), advance)
    records = [BenchmarkEditRecord.model_validate(d["record"]) for d in done]
    tests = [TestMeasurement.model_validate(t) for d in done for t in d["tests"]]
    auroc_points: dict[str, tuple[list, list, list]] = {name: ([], [], []) for name in PREDICTORS}
    for d in done:
        for name, pts in d["auroc"].items():
            for acc, new in zip(auroc_points[name], pts):
                acc.extend(tuple(x) if isinstance(x, list) else x for x in new)
    unrelated = [x for d in done for x in d["unrelated"]]
    summary = _summary(r, method, b, records, tests, auroc_points, unrelated, time.perf_counter() - t0)
    summary.resumed_edits = resumed
    return summary, tests


def _make_and_measure(r: RippleRun, method: EditMethod, b: BenchmarkRun, k: int, edit: BenchmarkEdit,
                      before: torch.Tensor, all_tests: torch.Tensor, test_edit: dict[int, int]) -> dict:
    """Edit ``k``: make it, measure, restore; its record, test measurements, AUROC points and
    unrelated changes as JSON-ready lists (the journal's payload)."""
    te = time.perf_counter()
    others = [t for t in b.unrelated_pool if test_edit[t] != k]
    with edited(method, r.context(), b.rewrites(edit)) as deltas:
        after = b.logprobs([*edit.tests, *edit.edits, *edit.originals, *others])
        greedy_after = dict(zip(edit.tests, greedy_matches(r.loaded.model, [b.variants[t] for t in edit.tests],
                                                           r.loaded.pad_id)))
    ctx = dataclasses.replace(b.ctx, first_order=first_order(r.reader, deltas))
    success = edit_succeeded(r.pieces, edit, before, after)
    own = torch.tensor(edit.tests, dtype=torch.long)
    preds = predict(ctx, edit.edits, edit.originals, all_tests)  # every edit's tests: AUROC
    own_preds = predict(ctx, edit.edits, edit.originals, own)     # the edit's own tests: correlations
    auroc, unrelated = {}, []
    if success:
        for name, v in preds.items():
            auroc[name] = (v.tolist(), [test_edit[t] == k for t in all_tests.tolist()],
                           [(r.pieces[t].criterion or "test", b.test_condition_known(t)) for t in all_tests.tolist()])
        unrelated = (after[others] - before[others]).tolist()
    tests = []
    for j, t in enumerate(edit.tests):
        c = edit.conditions[j]
        tests.append(TestMeasurement(
            edit=k, edit_id=r.pieces[edit.edits[0]].id, test_id=r.pieces[t].id, criterion=r.pieces[t].criterion or "test",
            logprob_before=float(before[t]), logprob_after=float(after[t]), rise=float(after[t] - before[t]),
            greedy_before=b.greedy_before[t], greedy_after=greedy_after[t],
            condition_known=b.condition_known.get(c) if c is not None else None, edit_success=success,
            predictors={n: _finite(v[j]) for n, v in own_preds.items()}))
    e0 = r.pieces[edit.edits[0]]
    record = BenchmarkEditRecord(
        edit=k, edit_ids=[r.pieces[i].id for i in edit.edits], question_id=edit.question_id,
        subject=e0.triple.subject if e0.triple else None, new_target=e0.answer, true_target=e0.answer_before,
        success=success, logprob_new_before=float(before[edit.edits].sum()), logprob_new_after=float(after[edit.edits].sum()),
        logprob_true_after=float(after[edit.originals].sum()) if edit.originals else None,
        subject_key_found=all(b.positions[i] != r.encoded[i].answer_start - 1 for i in edit.edits),
        edit_norm=edit_norm(deltas), n_tests=len(edit.tests), mean_rise_own_tests=float((after[own] - before[own]).mean()),
        restored=True, seconds=time.perf_counter() - te)
    return {"record": record.model_dump(mode="json"), "tests": [t.model_dump(mode="json") for t in tests],
            "auroc": auroc, "unrelated": unrelated}


def _summary(r: RippleRun, method: EditMethod, b: BenchmarkRun, records, tests, auroc_points, unrelated,
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
            "condition known", "answer match")
    return BenchmarkSummary(
        inputs=r.inputs(method), method=method.name, hparams=method.settings(),
        settings=r.cfg.ripple.model_dump(mode="json", exclude={"hparams"}), layer=b.layer.name, covariance=b.cov_source,
        n_edits=len(records), n_successful=sum(e.success for e in records), n_tests=len(tests), n_tests_counted=len(ok),
        exact_match=em, multi_hop_accuracy=float(np.mean(mh)) if mh else None,
        unrelated_change=describe(unrelated), predictors=predictor_reports(tests, auroc_points, r.cfg.ripple.bootstrap_resamples),
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
    b = BenchmarkRun(r, edits)
    points = []
    for strength in strengths:
        s, _ = evaluate_benchmark(r, r.method.with_knob(knob, strength), edits, show_progress, b)
        if s.n_successful == 0:
            log.warning(f"--sweep: at {knob}={strength:g} none of the {s.n_edits} {r.method.name} edits succeeded; "
                        f"check that {knob} is the knob you meant to vary (--sweep KNOB=v1,v2).")
        points.append(SweepPoint(
            strength=strength, n_edits=s.n_edits, n_successful=s.n_successful,
            mean_rise_own_tests=describe([e.mean_rise_own_tests for e in s.edits]),
            unrelated_change=s.unrelated_change, spearman={n: p.pooled.spearman for n, p in s.predictors.items()},
            pearson={n: p.pooled.pearson for n, p in s.predictors.items()}))
    return SweepSummary(inputs=r.inputs(r.method), method=r.method.name, knob=knob, points=points,
                        seconds=time.perf_counter() - t0)
