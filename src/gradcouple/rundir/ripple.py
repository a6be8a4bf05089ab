"""``RUN/ripple/``: the measured ripple effects of real edits, and what an unfinished ripple keeps.

    summary.json               RippleSummary (pieces mode) or BenchmarkSummary (benchmark mode)
    edits.jsonl | tests.jsonl  one line per (edit, other piece) | per (edit, test query)
    sweep.json                 SweepSummary: the same edits at several strengths
    journal-*.jsonl            finished edits of an unfinished ripple, one file per ripple inputs;
                               removed once the results are saved
    covariance-*.pt            a layer's key covariance over Wikipedia text, keyed by model, layer,
                               text and token budget
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

from pydantic import ValidationError

from ..artifacts import (
    BenchmarkSummary,
    CouplingStats,
    Inputs,
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
from .journal import Journal
from .read import read_model

if TYPE_CHECKING:
    from ..edits import EditMethod
    from .layout import RunDir

Summary = Union[RippleSummary, BenchmarkSummary]
Lines = Union[list[Measurement], list[TestMeasurement]]


class EditJournal:
    """Ripple's finished edits, so an interrupted ripple resumes: one line per edit, written only
    after the model's weights are restored. ``finished(k, key)`` is edit ``k``'s payload when its
    ``key`` (which edit it was) matches."""

    def __init__(self, path: Path):
        self._journal = Journal(path)
        self.done: dict[int, dict] = {}
        for entry in self._journal.lines():
            try:
                self.done[int(entry["edit"])] = entry
            except (KeyError, TypeError, ValueError):
                continue

    @property
    def path(self) -> Path:
        return self._journal.path

    def finished(self, k: int, key: str) -> Optional[dict]:
        """Edit ``k``'s payload from an earlier run, or None when it did not finish (or was another edit)."""
        entry = self.done.get(k)
        return entry["payload"] if entry and entry.get("key") == key else None

    def append(self, k: int, key: str, payload: dict) -> None:
        """Record edit ``k`` (identified by ``key``) as finished; durable when this returns."""
        self._journal.append({"edit": k, "key": key, "payload": payload})

    def each(self, keys: list[str], make: Callable[[int], dict], advance: Callable[[int], None]) -> tuple[list[dict], int]:
        """Every edit's payload, in order: read back when an earlier run finished edit ``k`` (with the
        same ``keys[k]``), else ``make(k)``, journalled before the next edit starts. Returns the
        payloads and how many were read back; the journal is closed afterwards."""
        out, resumed = [], 0
        try:
            for k, key in enumerate(keys):
                done = self.finished(k, key)
                if done is None:
                    done = make(k)
                    self.append(k, key, done)
                else:
                    resumed += 1
                out.append(done)
                advance(1)
        finally:
            self.close()
        return out, resumed

    def close(self) -> None:
        self._journal.close()


class RippleFiles:
    """The ripple files of one run directory."""

    def __init__(self, run: "RunDir"):
        self.run = run
        self.dir = run.root / "ripple"

    @property
    def summary_path(self) -> Path: return self.dir / "summary.json"
    @property
    def edits_path(self) -> Path: return self.dir / "edits.jsonl"
    @property
    def tests_path(self) -> Path: return self.dir / "tests.jsonl"
    @property
    def sweep_path(self) -> Path: return self.dir / "sweep.json"

    def _fix(self, flags: str = "") -> str:
        return f"rerun `gradcouple ripple --run {self.run.root}{flags}`."

    def save(self, summary: Summary, rows: Lines) -> None:
        """summary.json, and one line per measurement: edits.jsonl (pieces mode) or tests.jsonl
        (benchmark mode); the journals go, since every edit is now in the results."""
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

    def exists(self) -> bool:
        return self.summary_path.is_file()

    def load(self) -> tuple[Summary, Lines]:
        """The ripple summary (either mode) and its measurement lines.

        Raises:
            ArtifactError: unreadable or invalid summary or line (the message names the file and line).
        """
        fix = self._fix()
        try:
            mode = json.loads(self.summary_path.read_text(encoding="utf-8")).get("mode", "pieces")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ArtifactError(f"{self.summary_path}: unreadable ({e}); {fix}") from None
        model, line_model, path = ((BenchmarkSummary, TestMeasurement, self.tests_path) if mode == "benchmark"
                                   else (RippleSummary, Measurement, self.edits_path))
        summary = read_model(self.summary_path, model, fix)
        rows = []
        if path.is_file():
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(line_model.model_validate_json(line))
                    except ValidationError as e:
                        raise ArtifactError(f"{path}:{n}: {e.errors()[0]['msg']}; {fix}") from None
        return summary, rows

    def journal(self, inputs: Inputs) -> EditJournal:
        """The journal of finished edits for ripple inputs ``inputs`` (one file per inputs, so a
        sweep's strengths each resume), holding whatever an interrupted earlier run finished."""
        return EditJournal(self.dir / f"journal-{digest(inputs.values)[:12]}.jsonl")

    def clear_journals(self) -> None:
        """Remove every journal: called once ripple's results are saved."""
        for path in self.dir.glob("journal-*.jsonl"):
            path.unlink(missing_ok=True)

    def covariance_path(self, key: object) -> Path:
        """Where ripple keeps the key covariance computed under ``key`` (model fingerprint, layer, text, tokens)."""
        return self.dir / f"covariance-{digest(key)[:16]}.pt"

    @staticmethod
    def inputs(manifest: Manifest, stats: CouplingStats, cfg: RunConfig, method: "EditMethod") -> Inputs:
        """What ripple results made now under ``cfg`` with ``method`` (its resolved knobs) are made from."""
        return Inputs(values={"gradients": manifest.fingerprint(), "coupling": stats.matrix_sha256,
                              "config": cfg.ripple_hash(), "method": digest([method.name, method.settings()])[:16]})

    def current(self, manifest: Manifest, stats: CouplingStats) -> Optional[tuple[Summary, Lines]]:
        """The ripple results when present and made from this run's gradients and coupling; None when absent.

        Raises:
            ArtifactError: present but stale (the message names what changed).
        """
        if not self.exists():
            return None
        summary, rows = self.load()
        now = Inputs(values={"gradients": manifest.fingerprint(), "coupling": stats.matrix_sha256})
        was = Inputs(values={k: v for k, v in summary.inputs.values.items() if k in now.values})
        changed = stale_inputs(was, now)
        if changed:
            raise ArtifactError(f"{self.summary_path}: stale ripple results ({'; '.join(changed)}); rerun "
                                f"`gradcouple ripple --run {self.run.root}` or delete {self.dir}.")
        return summary, rows


__all__ = ["EditJournal", "RippleFiles"]
