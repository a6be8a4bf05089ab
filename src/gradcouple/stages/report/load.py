"""Everything the report reads from a run directory, loaded once through :class:`~gradcouple.rundir.RunDir`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ...artifacts import (
    BenchmarkSummary,
    CouplingStats,
    ForecastRow,
    ForecastSummary,
    Manifest,
    Measurement,
    PairRow,
    PieceRecord,
    RippleSummary,
    SweepSummary,
    TestMeasurement,
)
from ...config import RunConfig, load_config
from ...errors import ArtifactError
from ...pairs import neighbour_pairs, upper_pairs
from ...pieces import KnowledgePiece
from ...rules import same_answer, same_answer_matrix, same_question, same_question_matrix
from ...rundir import RunDir


log = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    """A run's artifacts as the report uses them; ``records`` and ``pieces`` are both in pieces.jsonl order.

    ``cosine`` is the (N, N) float64 GradSim matrix in full mode and the (N, k) kept GradSims in
    top-k mode, where ``indices`` (N, k) names each kept neighbour. ``files`` lists
    (relative path, bytes) of every file of the run at load time.
    """

    run: RunDir
    manifest: Manifest
    records: list[PieceRecord]
    pieces: list[KnowledgePiece]
    config: Optional[RunConfig]
    stats: CouplingStats
    cosine: torch.Tensor
    indices: Optional[torch.Tensor]
    pairs: list[PairRow]
    pairs_different_answer: list[PairRow]
    ripple: Optional[RippleSummary]
    measurements: list[Measurement]
    benchmark: Optional[BenchmarkSummary]
    tests: list[TestMeasurement]
    files: list[tuple[str, int]]
    ripple_sets: list[tuple[str, RippleSummary | BenchmarkSummary]] = field(default_factory=list)
    sweeps: list[tuple[str, SweepSummary]] = field(default_factory=list)  #: current --sweep results, oldest first
    stale_ripple: list[tuple[str, list[str]]] = field(default_factory=list)
    #: the latest forecast made from this run's gradients (summary, rows), or None
    forecast: Optional[tuple[ForecastSummary, list[ForecastRow]]] = None

    @property
    def full(self) -> bool:
        """Whether the whole N x N matrix was computed (else only each piece's top-k neighbours)."""
        return self.indices is None

    @property
    def owners(self) -> list[list[str]]:
        """Each piece's owning multi-hop question ids: the input of the same-question rule."""
        return [r.owners for r in self.records]

    def known_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(i, j, GradSim) of every off-diagonal pair the coupling holds, each unordered pair once (i < j)."""
        if self.full:
            return upper_pairs(self.cosine)
        return neighbour_pairs(self.indices, self.cosine)

    def same_question_mask(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Bool per pair (i, j): the same-question rule (:func:`gradcouple.rules.same_question`)."""
        if self.full:
            return same_question_matrix(self.owners)[i, j]
        # top-k runs are the large ones: an N x N membership matrix may not fit, the N*k pairs do
        own = self.owners
        return torch.tensor([same_question(own[a], own[b]) for a, b in zip(i.tolist(), j.tolist())], dtype=torch.bool)

    def same_answer_mask(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Bool per pair (i, j): the same-answer rule (:func:`gradcouple.rules.same_answer`) on the scored answers."""
        answers = [r.answer for r in self.records]
        if self.full:
            return same_answer_matrix(answers)[i, j]
        return torch.tensor([same_answer(answers[a], answers[b]) for a, b in zip(i.tolist(), j.tolist())], dtype=torch.bool)


def load_run(run_dir: str | Path) -> LoadedRun:
    """Load a run for the report, checking that its coupling and ripple results are current.

    Raises:
        ArtifactError: no complete extraction; coupling statistics, matrix or pairs.csv missing
            (the message names the file and ``gradcouple couple --run``); a stale coupling; a
            matrix whose pieces differ from pieces.jsonl. Stale ripple result sets are left out
            (``stale_ripple`` says which and why), never refused.
        DataError: an unreadable pieces.jsonl.
        ConfigError: an unreadable config.json.
    """
    run = RunDir(run_dir)
    manifest = run.gradients.load_manifest()
    stats = run.coupling.current_stats(manifest)
    if stats.mode == "full":
        (ids, cosine), indices = run.coupling.load_cosine(), None
    else:
        ids, indices, cosine = run.coupling.load_topk()
    run.check_pieces_match(ids, run.coupling.matrix_path())
    saved = run.saved_config_path()
    current, stale = run.ripple.current(manifest, stats)
    rip = current[-1][1:] if current else None  # the most recent set is shown in full, every set in the comparison
    pieces_mode, bench_mode = bool(rip) and rip[0].mode == "pieces", bool(rip) and rip[0].mode == "benchmark"
    return LoadedRun(run=run, manifest=manifest, records=manifest.records(), pieces=run.load_pieces(),
                     config=load_config(saved) if saved else None, stats=stats, cosine=cosine, indices=indices,
                     pairs=run.coupling.load_pairs(), pairs_different_answer=run.coupling.load_pairs(different_answer=True),
                     ripple=rip[0] if pieces_mode else None, measurements=rip[1] if pieces_mode else [],
                     benchmark=rip[0] if bench_mode else None, tests=rip[1] if bench_mode else [], files=run.files(),
                     ripple_sets=[(r.name, s) for r, s, _ in current], stale_ripple=[(r.name, c) for r, c in stale],
                     sweeps=[(r.name, s) for r, s in run.ripple.current_sweeps(manifest, stats)],
                     forecast=_current_forecast(run, manifest))


def _current_forecast(run: RunDir, manifest: Manifest) -> Optional[tuple[ForecastSummary, list[ForecastRow]]]:
    """The run's latest forecast when it was made from these gradients; an unreadable one is left out
    with a warning (the report is about the run, not about that file)."""
    if not run.forecast.exists():
        return None
    try:
        summary, rows = run.forecast.load()  # read once: the staleness check is of this summary
    except ArtifactError as e:
        log.warning(f"the report leaves the forecast out: {e}")
        return None
    return None if run.forecast.stale(summary, manifest) else (summary, rows)
