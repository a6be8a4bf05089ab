"""The ``forecast`` stage: before an edit is applied, which stored facts will it move?

For each edit request (a rewrite, or an MQuAKE case's rewrites together) the exact gradient of its
new target g_e is computed with the run's model and layers, and every stored piece j is scored
block by block from the gradient store, without forming any dense gradient (DESIGN.md, "Forecast"):

- ``first_order``: <g_j, Δθ> for the weight change Δθ the edit method (``--method``) computes; the
  edit is made, Δθ read and factored by its SVD when that is cheaper (ROME's is rank one), and the
  weights restored bit for bit; Δθ is not kept;
- ``gradsim``: cos(g_e, g_j), with the stored pieces' exact norms from the manifest;
- ``inner_product``: <g_e, g_j>, g_e kept factored (its T tokens are T rank-one terms).

The edit file's own test queries (EasyEdit's portability and locality prompts, CounterFact's
paraphrase and neighbourhood prompts, RippleEdits' tests) are scored beside the stored pieces.
Pieces are ranked by |score|. ``--verify K`` makes each edit for real and measures the change of
log P of every predictor's top K, of an equal random sample of the rest and of the edit's own
tests; the statistics are defined once in :data:`gradcouple.metrics.DEFINITIONS`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from ..artifacts import ForecastCheck, ForecastEdit, ForecastRewrite, ForecastRow, ForecastSummary, ForecastVerify, Inputs
from ..config import RunConfig
from ..datasets import read_file
from ..edits import Rewrite, edit_norm, edited
from ..errors import ConfigError, DataError
from ..gradients import PieceFactors, batch_factors, factored_sq_norm
from ..gram import contract
from ..io import digest
from ..metrics import DEFINITIONS, bootstrap_interval, clustered_correlation, precision_at_k, spearman
from ..models import LoadedModel
from ..pieces import KnowledgePiece, PieceKind, PieceRole, Triple
from ..predictors import PREDICTORS
from ..progress import progress
from ..rules import RULES, stable_test
from ..rundir import locked
from ..runinfo import device_info, use_threads
from ..scoring import EncodedPiece, collate, encode, measure_logprobs, subject_position
from ..stores import Direction
from ..suffix import lowest_block
from .benchmark import BenchmarkEdit, benchmark_edits, edit_succeeded
from .edit_run import RippleRun, check_run

log = logging.getLogger(__name__)

#: the predictors a forecast computes from the store alone (their definitions are the ripple stage's)
FORECAST_PREDICTORS = ("first_order", "gradsim", "inner_product")
LONG_EDIT = "edit longer than the extraction's --max-length"
UNTOKENIZABLE = "edit whose prompt or new target yields no token"
NO_SUBJECT = "subject not in the prompt"
LONG_TEST = "test query longer than the extraction's --max-length"


@dataclass
class EditRequest:
    """One edit to forecast: its rewrites (edit pieces, NEW target as answer, applied together), their
    originals (true targets) and the file's test queries of it."""

    id: str
    rewrites: list[KnowledgePiece]
    originals: list[KnowledgePiece]
    tests: list[KnowledgePiece]


def edit_requests(pieces: list[KnowledgePiece]) -> list[EditRequest]:
    """The edit pieces (role ``edit``) grouped into requests as the ripple benchmark groups them
    (:func:`~gradcouple.stages.benchmark.benchmark_edits`: an MQuAKE case's rewrites are one request),
    in file order, each with its originals and tests, those without tests included."""
    return [EditRequest(pieces[e.edits[0]].id, [pieces[i] for i in e.edits], [pieces[i] for i in e.originals],
                        [pieces[i] for i in e.tests]) for e in benchmark_edits(pieces, with_untested=True)]


def single_edit(prompt: str, target: str, subject: Optional[str] = None) -> EditRequest:
    """The request of ``--edit PROMPT --target NEW [--subject S]``: a cloze piece ``cli:0:edit``.

    Raises:
        ConfigError: an empty prompt or target, or a subject the prompt does not contain.
    """
    if not (prompt or "").strip() or not (target or "").strip():
        raise ConfigError("--edit and --target: both are needed (an edit prompt and its new target), or pass --edits FILE.")
    if subject is not None and subject.casefold() not in prompt.casefold():
        raise ConfigError(f"--subject {subject!r}: not in the --edit prompt {prompt!r}; ROME and MEMIT read the key at "
                          f"the subject's last token, so give the subject as the prompt writes it.")
    piece = KnowledgePiece(id="cli:0:edit", dataset="cli", question_id="0", hop=0, kind=PieceKind.cloze, prompt=prompt.strip(),
                           answer=target.strip(), role=PieceRole.edit, owners=["0"],
                           triple=Triple(subject=subject, relation="edited fact", object=target.strip()) if subject else None)
    return EditRequest(piece.id, [piece], [], [])


def read_requests(path: str | Path, format: Optional[str] = None,
                  skip_bad: bool = False) -> tuple[list[EditRequest], str, dict[str, int]]:
    """The edit requests of a file: gradcouple pieces (role ``edit``), EasyEdit / KnowEdit JSON,
    CounterFact, MQuAKE or RippleEdits records (:func:`gradcouple.datasets.read_file`).

    Raises:
        DataError: unreadable file, unknown format, a malformed record without ``skip_bad`` (naming the
            file, record and field), or no edit request in the file.
    """
    pieces, fmt, skipped = read_file(path, format=format, skip_bad=skip_bad)
    requests = edit_requests(pieces)
    if not requests:
        raise DataError(f"--edits {path}: no edit request in it ({fmt} records made {len(pieces)} pieces, none an edit); "
                        f"give EasyEdit, CounterFact, MQuAKE or RippleEdits records, or pieces with role 'edit'.")
    return requests, fmt, skipped


class ForecastResult(BaseModel):
    """What ``forecast`` wrote (``path``: forecast.jsonl) and its summary and rows."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    path: Path
    summary: ForecastSummary
    rows: list[ForecastRow]

    def table(self):
        """The rows as a pandas DataFrame (one row per edit, predictor and piece listed)."""
        import pandas as pd  # deferred: pandas, for notebooks only (the CLI prints the rows)

        return pd.DataFrame([r.model_dump() for r in self.rows])


class _Skip(Exception):
    """A request that cannot be forecast as given; counted under ``reason`` in the summary's ``skipped``."""

    def __init__(self, reason: str):
        self.reason = reason


@dataclass
class _Prepared:
    """A request ready to score: encoded rewrites with key positions, its tests and their encodings;
    :meth:`with_factors` adds the factors of both (computed when the request is scored, not before)."""

    request: EditRequest
    rewrites: list[Rewrite]
    tests: list[KnowledgePiece]
    test_encoded: list[EncodedPiece]
    factors: list[PieceFactors] = field(default_factory=list)   # rewrites first, then tests
    seconds: float = 0.0                                        # spent on the gradients

    def with_factors(self, r: RippleRun) -> "_Prepared":
        t0 = time.perf_counter()
        self.factors = _factors(r, [w.new for w in self.rewrites] + self.test_encoded)
        self.seconds = time.perf_counter() - t0
        return self

    def gradient(self, names: list[str]) -> dict[str, Direction]:
        """g_e = sum over rewrites of their gradients, per target, kept factored."""
        k = len(self.rewrites)
        return {n: Direction.of_factors(torch.cat([f.x[n] for f in self.factors[:k]]), torch.cat([f.d[n] for f in self.factors[:k]]))
                for n in names}

    def gradient_norm(self, names: list[str]) -> float:
        """|g_e| over every target, in float64."""
        k = len(self.rewrites)
        return sum(factored_sq_norm(torch.cat([f.x[n] for f in self.factors[:k]]),
                                    torch.cat([f.d[n] for f in self.factors[:k]])) for n in names) ** 0.5


def _prepare(r: RippleRun, request: EditRequest, skipped: dict[str, int], keyed: bool = True) -> _Prepared:
    """The request encoded as the extraction encodes pieces; raises _Skip for an edit that cannot be
    scored as given (longer than --max-length, not tokenizable as prompt + answer) or, when an edit
    will be made (``keyed``), whose subject its prompt does not name (ROME's and MEMIT's key)."""
    tok, template, max_length = r.loaded.tokenizer, r.template, r.max_length
    rewrites = []
    for p in request.rewrites:
        prompt, answer = p.render(template)
        try:
            enc = encode(tok, prompt, answer, max_length, where=f"edit {p.id}: ")
        except DataError as e:
            raise _Skip(LONG_EDIT if "longer than" in str(e) else UNTOKENIZABLE) from None
        if enc.truncated_tokens:
            raise _Skip(LONG_EDIT)
        subject = p.triple.subject if p.triple else None
        pos = subject_position(tok, enc, subject) if subject else None
        if subject and pos is None and keyed:
            raise _Skip(NO_SUBJECT)
        rewrites.append(Rewrite(enc, pos, subject))
    tests, encoded = [], []
    for p in request.tests:
        prompt, answer = p.render(template)
        try:
            encoded.append(encode(tok, prompt, answer, max_length, where=f"test {p.id}: "))
            tests.append(p)
        except DataError:
            skipped[LONG_TEST] = skipped.get(LONG_TEST, 0) + 1
    return _Prepared(request, rewrites, tests, encoded)


def _factors(r: RippleRun, encoded: list[EncodedPiece]) -> list[PieceFactors]:
    """Exact factors of each encoded piece on the model as it is, in length-sorted batches (input order)."""
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].n_inputs)
    out: list[Optional[PieceFactors]] = [None] * len(encoded)
    bs = r.manifest.batch_size
    for k in range(0, len(order), bs):
        idx = order[k:k + bs]
        batch = collate([encoded[i] for i in idx], r.loaded.pad_id).to(r.loaded.device)
        for i, f in zip(idx, batch_factors(r.loaded.model, r.targets, batch)):
            out[i] = f
    return out  # type: ignore[return-value]


def _test_scores(kind, prep: _Prepared, directions: dict[str, Direction], dtype: torch.dtype) -> torch.Tensor:
    """<g_q, D> for each of the request's own tests, as the store kind scores its stored pieces (exactly,
    or through the same sketch for a projected store): (T,) float64."""
    k = len(prep.rewrites)
    return torch.tensor([sum(kind.contract_factors(n, f.x[n], f.d[n], directions[n], dtype) for n in directions)
                         for f in prep.factors[k:]], dtype=torch.float64)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of each score by |score|, largest first (NaN last; ties by position)."""
    key = torch.where(scores.isnan(), torch.full_like(scores, -1.0), scores.abs())
    order = torch.sort(-key, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1)
    return ranks


class Forecaster:
    """A run ready to forecast edits: model, store, method, settings (one per ``forecast`` call)."""

    def __init__(self, r: RippleRun, cfg: RunConfig):
        self.r, self.cfg = r, cfg
        fc = cfg.forecast
        self.predictors = list(FORECAST_PREDICTORS) if fc.verify else list(dict.fromkeys(fc.predictors))
        self.dtype = torch.float64 if fc.precision == "float64" else torch.float32
        self.device = r.loaded.device if r.loaded.device.type == "cuda" else torch.device("cpu")
        self.names = r.manifest.names
        self.n = r.reader.n
        self.norms = r.norms
        self.needs_edit = "first_order" in self.predictors or fc.verify is not None

    def scores(self, prep: _Prepared, directions: dict[str, Direction], show_progress: bool) -> torch.Tensor:
        """<g_j, D> for every stored piece then every own test: (N + T,) float64."""
        dirs = {n: d.to(self.device) for n, d in directions.items()}
        with progress("forecast", self.n, "pieces", show_progress) as advance:
            stored = contract(self.r.reader, dirs, self.cfg.couple.block_size, dtype=self.dtype, progress=advance)
        return torch.cat([stored, _test_scores(self.r.reader.kind, prep, dirs, self.dtype)])

    def encoded(self, prep: _Prepared, rows: list[int]) -> list[EncodedPiece]:
        """Encodings of combined indices (stored rows, then own tests), as extraction scored them."""
        r, out = self.r, []
        for c in rows:
            if c < self.n:
                prompt, answer = r.pieces[c].render(r.template)
                out.append(encode(r.loaded.tokenizer, prompt, answer, r.max_length))
            else:
                out.append(prep.test_encoded[c - self.n])
        return out

    def forecast_one(self, k: int, prep: _Prepared, show_progress: bool) -> dict:
        """Score one request with every predictor (and verify it): the journal payload."""
        r, fc = self.r, self.cfg.forecast
        prep.with_factors(r)  # on the unedited model
        seconds: dict[str, float] = {"gradient": prep.seconds}
        t = time.perf_counter()
        grad = prep.gradient(self.names)
        norm_e = prep.gradient_norm(self.names)
        scores: dict[str, torch.Tensor] = {}
        if "gradsim" in self.predictors or "inner_product" in self.predictors:
            inner = self.scores(prep, grad, show_progress)
            q_norms = torch.cat([self.norms, torch.tensor([sum(f.sq_norm.values()) ** 0.5 for f in prep.factors[len(prep.rewrites):]],
                                                          dtype=torch.float64)])
            denom = norm_e * q_norms
            if "inner_product" in self.predictors:
                scores["inner_product"] = inner
            if "gradsim" in self.predictors:
                scores["gradsim"] = torch.where(denom > 0, inner / denom.clamp_min(1e-300), torch.zeros_like(inner))
        seconds["scores"] = time.perf_counter() - t
        edit_seconds = verify_seconds = 0.0
        measured: list[int] = []
        sample: list[int] = []
        after = before = None
        norm = success = None
        fixed = [w.new for w in prep.rewrites]
        rng = np.random.default_rng(self.cfg.ripple.seed + k)
        if self.needs_edit:
            method = r.method
            te = time.perf_counter()
            with edited(method, r.context(), prep.rewrites) as delta:
                edit_seconds = time.perf_counter() - te
                norm = edit_norm(delta)
                if "first_order" in self.predictors:
                    ts = time.perf_counter()
                    dirs = {n: Direction.of_matrix(delta[n].float()) if method.low_rank else Direction(matrix=delta[n].float())
                            for n in self.names}
                    scores["first_order"] = self.scores(prep, dirs, show_progress)
                    seconds["scores"] += time.perf_counter() - ts
                if fc.verify:
                    tv = time.perf_counter()
                    measured, sample = self._measured(prep, scores, fc.verify, rng)
                    originals = self._originals(prep)
                    enc = self.encoded(prep, measured) + fixed + [e for _, e in originals]
                    after = measure_logprobs(r.loaded.model, enc, r.manifest.batch_size, r.loaded.pad_id)
                    verify_seconds += time.perf_counter() - tv
            if fc.verify:
                tv = time.perf_counter()
                before = measure_logprobs(r.loaded.model, enc, r.manifest.batch_size, r.loaded.pad_id)
                verify_seconds += time.perf_counter() - tv
                success = self._success(prep, [p for p, _ in originals], before[len(measured):], after[len(measured):])
        seconds["edit"] = edit_seconds
        if fc.verify:
            seconds["verify"] = verify_seconds
        payload = self._payload(k, prep, scores, measured, sample, before, after, norm, success, seconds)
        prep.factors = []  # a long edit file keeps one request's factors at a time
        return payload

    def _originals(self, prep: _Prepared) -> list[tuple[KnowledgePiece, EncodedPiece]]:
        """The request's originals (true targets) that encode, with their encodings."""
        r, out = self.r, []
        for p in prep.request.originals:
            prompt, answer = p.render(r.template)
            try:
                out.append((p, encode(r.loaded.tokenizer, prompt, answer, r.max_length)))
            except DataError:
                continue
        return out

    @staticmethod
    def _success(prep: _Prepared, originals: list[KnowledgePiece], before: torch.Tensor, after: torch.Tensor) -> bool:
        """``DEFINITIONS['edit success']`` (:func:`~gradcouple.stages.benchmark.edit_succeeded`) of the
        rewrites, ``before``/``after`` holding the log-probs of the rewrites then of ``originals``."""
        pieces = [*prep.request.rewrites, *originals]
        k = len(prep.request.rewrites)
        edit = BenchmarkEdit(prep.request.id, list(range(k)), list(range(k, len(pieces))), [], [])
        return edit_succeeded(pieces, edit, before, after)

    def _measured(self, prep: _Prepared, scores: dict[str, torch.Tensor], k: int, rng) -> tuple[list[int], list[int]]:
        """Combined indices measured by --verify (``DEFINITIONS['verified pieces']``): every predictor's top k,
        the request's own tests, and a seeded random sample of as many other stored pieces as the top k
        hold (returned apart: the sample is in no predictor's top k)."""
        top: set[int] = set()
        for s in scores.values():
            top |= set((_ranks(s) <= k).nonzero().flatten().tolist())
        own = set(range(self.n, self.n + len(prep.tests)))
        rest = np.array(sorted(set(range(self.n)) - top))
        size = min(len(top - own), len(rest))
        sample = sorted(rng.choice(rest, size=size, replace=False).tolist()) if size else []
        return sorted(top | set(sample) | own), sample

    def _payload(self, k: int, prep: _Prepared, scores: dict[str, torch.Tensor], measured: list[int], sample: list[int],
                 before: Optional[torch.Tensor], after: Optional[torch.Tensor], norm: Optional[float],
                 success: Optional[bool], seconds: dict[str, float]) -> dict:
        fc = self.cfg.forecast
        req = prep.request
        change = {c: float(after[i] - before[i]) for i, c in enumerate(measured)} if after is not None else {}
        rows, checks = [], {}
        for name, s in scores.items():
            ranks = _ranks(s)
            listed = sorted(set((ranks <= fc.top_k).nonzero().flatten().tolist()) | set(range(self.n, len(s))) | set(change))
            for c in sorted(listed, key=lambda c: int(ranks[c])):
                rows.append(self._row(req, name, prep, c, float(s[c]), int(ranks[c]), change.get(c)).model_dump(mode="json"))
            if change:
                checks[name] = self._check(prep, s, ranks, measured, sample, change, fc.verify)
        edit = ForecastEdit(id=req.id, rewrites=[ForecastRewrite(prompt=p.prompt, target=p.answer,
                                                                 subject=p.triple.subject if p.triple else None)
                                                 for p in req.rewrites],
                            n_tests=len(prep.tests), edit_norm=norm, success=success, seconds=seconds)
        return {"edit": edit.model_dump(mode="json"), "rows": rows, "checks": checks,
                "chance": fc.verify / len(measured) if measured else None, "n_measured": len(measured)}

    def _row(self, req: EditRequest, name: str, prep: _Prepared, c: int, score: float, rank: int,
             change: Optional[float]) -> ForecastRow:
        if c < self.n:
            p = self.r.pieces[c]
            return ForecastRow(edit=req.id, predictor=name, piece_id=p.id, source="store", prompt=p.prompt, answer=p.answer,
                               score=score, rank=rank, change=change)
        t = prep.tests[c - self.n]
        return ForecastRow(edit=req.id, predictor=name, piece_id=t.id, source="file", prompt=t.prompt, answer=t.answer,
                           score=score, rank=rank, own_test=True, criterion=t.criterion, stable=stable_test(t.criterion),
                           change=change)

    def _check(self, prep: _Prepared, s: torch.Tensor, ranks: torch.Tensor, measured: list[int], sample: list[int],
               change: dict[int, float], k: int) -> dict:
        """One request's verify statistics for one predictor (aggregated over requests in the summary):
        correlations and precision@k over every measured piece; |change| of the stored pieces among its
        top k and of the random sample; the fractions of its own moving and stable tests in the top k."""
        x = torch.tensor([float(s[c]) for c in measured], dtype=torch.float64)
        y = torch.tensor([change[c] for c in measured], dtype=torch.float64)
        top = [c for c in measured if ranks[c] <= k and c < self.n]
        moving = [c for c in range(self.n, self.n + len(prep.tests)) if not stable_test(prep.tests[c - self.n].criterion)]
        stable = [c for c in range(self.n, self.n + len(prep.tests)) if stable_test(prep.tests[c - self.n].criterion)]
        return {"x": x.tolist(), "y": y.tolist(), "within": spearman(x, y), "precision": precision_at_k(x, y, k),
                "recall": float(np.mean([ranks[c] <= k for c in moving])) if moving else None,
                "stable": float(np.mean([ranks[c] <= k for c in stable])) if stable else None,
                "top_abs": [abs(change[c]) for c in top], "sample_abs": [abs(change[c]) for c in sample]}


def _verify_summary(k: int, payloads: list[dict], predictors: list[str], n_resamples: int) -> ForecastVerify:
    checks: dict[str, ForecastCheck] = {}
    for name in predictors:
        got = [(e, p["checks"][name]) for e, p in enumerate(payloads) if name in p.get("checks", {})]
        xs = [v for _, c in got for v in c["x"]]
        ys = [v for _, c in got for v in c["y"]]
        clusters = [e for e, c in got for _ in c["x"]]
        top = [v for _, c in got for v in c["top_abs"]]
        sample = [v for _, c in got for v in c["sample_abs"]]
        checks[name] = ForecastCheck(
            spearman=clustered_correlation(xs, ys, clusters, "spearman", n_resamples),
            within_edit_spearman=bootstrap_interval([c["within"] for _, c in got]),
            precision_at_k=bootstrap_interval([c["precision"] for _, c in got]),
            recall_own_tests=bootstrap_interval([c["recall"] for _, c in got]),
            stable_tests_in_top_k=bootstrap_interval([c["stable"] for _, c in got]),
            mean_abs_change_top_k=float(np.mean(top)) if top else None,
            mean_abs_change_sample=float(np.mean(sample)) if sample else None)
    chances = [p["chance"] for p in payloads if p.get("chance") is not None]
    return ForecastVerify(k=k, n_edits=sum(1 for p in payloads if p.get("checks")), n_measured=sum(p["n_measured"] for p in payloads),
                          precision_at_k_chance=float(np.mean(chances)) if chances else None, predictors=checks)


@locked("forecast")
def forecast(cfg: RunConfig, run_dir: str | Path, requests: list[EditRequest], *, edits_file: Optional[str | Path] = None,
             format: Optional[str] = None, skipped: Optional[dict[str, int]] = None, loaded: Optional[LoadedModel] = None,
             show_progress: bool = True) -> ForecastResult:
    """Forecast, for each edit request, every stored piece's score under ``forecast.predictors`` (all
    three with ``forecast.verify``), list the top ``forecast.top_k``, and (verify) make the edits and
    measure. Writes ``RUN/forecast/forecast.jsonl`` and ``summary.json``; finished edits are
    journalled, so an interrupted forecast resumes.

    Raises:
        ArtifactError: no extraction in ``run_dir``, the model differs from the extraction's, or the
            method edits layers the extraction lacks (first_order, --verify).
        DataError: no request survives the checks (each skip is counted by reason).
    """
    t0 = time.perf_counter()
    use_threads(cfg.model.threads)
    fc = cfg.forecast
    needs_edit = "first_order" in fc.predictors or fc.verify is not None
    r = check_run(cfg, run_dir, loaded, prepare=needs_edit, coupled=False, encode=False)
    f = Forecaster(r, cfg)
    skipped = dict(skipped or {})
    prepared: list[_Prepared] = []
    for req in requests:
        try:
            prep = _prepare(r, req, skipped, keyed=needs_edit)
        except _Skip as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            log.warning(f"edit {req.id}: skipped ({e.reason}).")
            continue
        prepared.append(prep)
    if not prepared:
        raise DataError(f"no edit to forecast: every request was skipped ({', '.join(f'{k}: {v}' for k, v in skipped.items())}).")
    inputs = Inputs(values={
        "gradients": r.manifest.fingerprint(),
        "edits": digest([[p.model_dump(mode="json") for p in (*q.rewrites, *q.originals, *q.tests)] for q in requests]),
        "method": digest([r.method.name, r.method.settings()])[:16] if needs_edit else "none",
        "forecast": digest([fc.model_dump(mode="json"), cfg.ripple.seed])[:16]})
    keys = [f"{p.request.id}:{hashlib.sha256(repr([(w.new.ids, w.key_position) for w in p.rewrites]).encode()).hexdigest()[:12]}"
            for p in prepared]
    lowest = lowest_block(r.method.touched(r.targets)) if needs_edit else None
    with r.executing(lowest), progress("edits", len(prepared), "edits", show_progress and len(prepared) > 1) as advance:
        payloads, resumed = r.run.forecast.journal(inputs).each(
            keys, lambda k: f.forecast_one(k, prepared[k], show_progress and len(prepared) == 1), advance)
    rows = [ForecastRow.model_validate(row) for p in payloads for row in p["rows"]]
    used = ("ripple effect", "first-order prediction", "GradSim", "forecast rank", "verified pieces", "own-test recall",
            "Spearman's rho", "clustered bootstrap interval", "bootstrap interval", "precision@k", "edit success")
    defs = {k: DEFINITIONS[k] for k in used} | {"stable test": RULES["stable test"]} | \
        {f"predictor {n}": PREDICTORS[n][1] for n in f.predictors}
    summary = ForecastSummary(
        inputs=inputs, edits_file=str(edits_file) if edits_file else None, format=format, method=r.method.name,
        hparams=r.method.settings() if needs_edit else {}, method_source=r.method.source if needs_edit else None,
        predictors=f.predictors, top_k=fc.top_k, precision=fc.precision, store=r.reader.kind.name, exact=r.reader.kind.exact,
        n_pieces=r.reader.n, skipped=skipped, resumed_edits=resumed,
        edits=[ForecastEdit.model_validate(p["edit"]) for p in payloads],
        verify=_verify_summary(fc.verify, payloads, f.predictors, cfg.ripple.bootstrap_resamples) if fc.verify else None,
        definitions=defs, seconds=time.perf_counter() - t0, device=device_info(r.loaded.device))
    r.run.forecast.save(summary, rows)
    return ForecastResult(path=r.run.forecast.rows_path, summary=summary, rows=rows)


__all__ = ["EditRequest", "FORECAST_PREDICTORS", "ForecastResult", "edit_requests", "forecast", "read_requests", "single_edit"]
