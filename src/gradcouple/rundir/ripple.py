"""``RUN/ripple/``: the measured ripple effects of real edits, one result set per edit method and
settings, side by side, and what an unfinished ripple keeps.

    <method>-<hash>/                   one result set: made by one method with one set of knobs and
                                       ripple settings (``ft-3fa9c2d1``); another method or setting
                                       makes another set, and never replaces this one
        summary.json                   RippleSummary (pieces mode) or BenchmarkSummary (benchmark mode)
        edits.jsonl | tests.jsonl      one line per (edit, other piece) | per (edit, test query)
        sweep.json                     SweepSummary: the same edits at several values of one knob
        layer_sweep.json               LayerSweepSummary: the method's efficacy with each block as its layer
        journal-*.jsonl                finished edits of an unfinished ripple (one file per inputs);
                                       removed once the set's results are saved
    covariance-*.pt                    a layer's key covariance over Wikipedia text, keyed by model,
                                       layer, text and token budget
    summary.json, tests.jsonl, ...     a run made before result sets: read as the set 'ripple'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Union

from ..artifacts import (
    BenchmarkSummary,
    CouplingStats,
    Inputs,
    LayerSweepSummary,
    Manifest,
    Measurement,
    RippleSummary,
    SweepSummary,
    TestMeasurement,
)
from ..config import RunConfig
from ..errors import ArtifactError
from ..io import atomic_open, digest, write_json
from .freshness import stale_inputs
from .journal import EditJournal
from .read import read_lines, read_model

if TYPE_CHECKING:
    from ..edits import EditMethod
    from .layout import RunDir

Summary = Union[RippleSummary, BenchmarkSummary]
Lines = Union[list[Measurement], list[TestMeasurement]]


class RippleResults:
    """The files of one result set (a directory of ``RUN/ripple``), named :attr:`name`."""

    def __init__(self, run: "RunDir", directory: Path):
        self.run, self.dir = run, directory

    def __repr__(self) -> str:
        return f"RippleResults({str(self.dir)!r})"

    @property
    def name(self) -> str:
        """The set's name: ``<method>-<hash>`` ('ripple' for a run made before result sets)."""
        return self.dir.name

    @property
    def summary_path(self) -> Path: return self.dir / "summary.json"
    @property
    def edits_path(self) -> Path: return self.dir / "edits.jsonl"
    @property
    def tests_path(self) -> Path: return self.dir / "tests.jsonl"
    @property
    def sweep_path(self) -> Path: return self.dir / "sweep.json"
    @property
    def layer_sweep_path(self) -> Path: return self.dir / "layer_sweep.json"

    def _fix(self, flags: str = "") -> str:
        return f"rerun `gradcouple ripple --run {self.run.root}{flags}`."

    def journal(self, inputs: Inputs) -> EditJournal:
        """The journal of finished edits for ripple inputs ``inputs`` (one file per inputs, so a
        sweep's points each resume), holding whatever an interrupted earlier run finished."""
        return EditJournal(self.dir / f"journal-{digest(inputs.values)[:12]}.jsonl")

    def clear_journals(self) -> None:
        """Remove the set's journals: called once its results are saved."""
        for path in self.dir.glob("journal-*.jsonl"):
            path.unlink(missing_ok=True)

    def save(self, summary: Summary, rows: Lines) -> None:
        """summary.json, and one line per measurement: edits.jsonl (pieces mode) or tests.jsonl
        (benchmark mode); the set's journals go, since every edit is now in the results."""
        keep = self.tests_path if summary.mode == "benchmark" else self.edits_path
        for stale in {self.tests_path, self.edits_path} - {keep}:
            stale.unlink(missing_ok=True)
        with atomic_open(keep, "w", encoding="utf-8") as fh:
            for m in rows:
                fh.write(m.model_dump_json() + "\n")
        write_json(self.summary_path, summary.model_dump(mode="json"))
        self.clear_journals()

    def save_sweep(self, sweep: SweepSummary) -> None:
        write_json(self.sweep_path, sweep.model_dump(mode="json"))
        self.clear_journals()

    def load_sweep(self) -> SweepSummary:
        return read_model(self.sweep_path, SweepSummary, self._fix(" --sweep ..."))

    def save_layer_sweep(self, sweep: LayerSweepSummary) -> None:
        write_json(self.layer_sweep_path, sweep.model_dump(mode="json"))
        self.clear_journals()

    def load_layer_sweep(self) -> LayerSweepSummary:
        return read_model(self.layer_sweep_path, LayerSweepSummary, self._fix(" --layer-sweep ..."))

    def exists(self) -> bool:
        return self.summary_path.is_file()

    def load(self) -> tuple[Summary, Lines]:
        """The set's summary (either mode) and its measurement lines.

        Raises:
            ArtifactError: absent, unreadable or invalid summary or line (the message names the file and line).
        """
        fix = self._fix()
        try:
            mode = json.loads(self.summary_path.read_text(encoding="utf-8")).get("mode", "pieces")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ArtifactError(f"{self.summary_path}: unreadable ({e}); {fix}") from None
        model, line_model, path = ((BenchmarkSummary, TestMeasurement, self.tests_path) if mode == "benchmark"
                                   else (RippleSummary, Measurement, self.edits_path))
        return read_model(self.summary_path, model, fix), read_lines(path, line_model, fix)

    def stale(self, manifest: Manifest, stats: CouplingStats) -> list[str]:
        """What changed since the set was made ([] when it was made from this run's gradients and coupling)."""
        summary, _ = self.load()
        return _changed(summary.inputs, manifest, stats)


def _changed(inputs: Inputs, manifest: Manifest, stats: CouplingStats) -> list[str]:
    now = Inputs(values={"gradients": manifest.fingerprint(), "coupling": stats.matrix_sha256})
    return stale_inputs(Inputs(values={k: v for k, v in inputs.values.items() if k in now.values}), now)


class RippleFiles:
    """The ripple files of one run directory: its result sets, and the covariances they share."""

    def __init__(self, run: "RunDir"):
        self.run = run
        self.dir = run.root / "ripple"

    def results(self, cfg: RunConfig, method: "EditMethod") -> RippleResults:
        """The result set of edits made with ``method`` (its resolved knobs) under ``cfg``'s ripple settings."""
        return RippleResults(self.run, self.dir / f"{method.name}-{digest([cfg.ripple_hash(), method.name, method.settings()])[:8]}")

    def sets(self) -> list[RippleResults]:
        """Every result set with a summary (or a sweep), oldest first ('ripple' of a run made before sets included)."""
        found = [RippleResults(self.run, d) for d in self.dir.iterdir() if d.is_dir()] if self.dir.is_dir() else []
        legacy = RippleResults(self.run, self.dir)
        found = [r for r in found if r.exists() or r.sweep_path.is_file() or r.layer_sweep_path.is_file()]
        if legacy.exists():
            found.append(legacy)
        return sorted(found, key=lambda r: next(p for p in (r.summary_path, r.sweep_path, r.layer_sweep_path)
                                                if p.is_file()).stat().st_mtime_ns)

    def latest(self) -> RippleResults:
        """The most recently written result set.

        Raises:
            ArtifactError: ripple has not been run.
        """
        sets = [r for r in self.sets() if r.exists()]
        if not sets:
            raise ArtifactError(f"{self.dir}: no ripple results; run `gradcouple ripple --run {self.run.root}` first.")
        return sets[-1]

    def exists(self) -> bool:
        return any(r.exists() for r in self.sets())

    def load(self) -> tuple[Summary, Lines]:
        """The most recent result set's summary and lines (:meth:`latest`)."""
        return self.latest().load()

    @staticmethod
    def inputs(manifest: Manifest, stats: CouplingStats, cfg: RunConfig, method: "EditMethod") -> Inputs:
        """What ripple results made now under ``cfg`` with ``method`` (its resolved knobs) are made from."""
        return Inputs(values={"gradients": manifest.fingerprint(), "coupling": stats.matrix_sha256,
                              "config": cfg.ripple_hash(), "method": digest([method.name, method.settings()])[:16]})

    def current(self, manifest: Manifest, stats: CouplingStats) -> tuple[list[tuple[RippleResults, Summary, Lines]],
                                                                          list[tuple[RippleResults, list[str]]]]:
        """The result sets made from this run's gradients and coupling (set, summary, lines), oldest
        first, and the stale ones with what changed since (a report leaves those out, saying so)."""
        current, stale = [], []
        for r in self.sets():
            if not r.exists():
                continue
            changed = r.stale(manifest, stats)
            if changed:
                stale.append((r, changed))
            else:
                current.append((r, *r.load()))
        return current, stale

    def current_sweeps(self, manifest: Manifest, stats: CouplingStats) -> list[tuple[RippleResults, SweepSummary]]:
        """The ``--sweep`` results made from this run's gradients and coupling, oldest first."""
        out = []
        for r in self.sets():
            if r.sweep_path.is_file():
                sweep = r.load_sweep()
                if not _changed(sweep.inputs, manifest, stats):
                    out.append((r, sweep))
        return out


__all__ = ["EditJournal", "RippleFiles", "RippleResults"]
