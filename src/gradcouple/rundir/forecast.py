"""``RUN/forecast/``: the latest forecast of which stored pieces edits will move.

    forecast.jsonl          ForecastRow per line: each edit's top pieces per predictor, its own tests,
                            and (--verify) every measured piece with its measured change
    summary.json            ForecastSummary: the edits, settings and (--verify) the statistics
    journal-*.jsonl         finished edits of an unfinished forecast (one file per inputs); removed
                            once the forecast of those inputs is saved

A new forecast replaces the previous one; its inputs (the gradients, a digest of the edit
requests, the method's knobs, the forecast settings) are recorded, and :meth:`ForecastFiles.stale`
names what changed since.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..artifacts import ForecastRow, ForecastSummary, Inputs, Manifest
from ..io import atomic_open, digest, write_json
from .freshness import stale_inputs
from .journal import EditJournal
from .read import read_lines, read_model

if TYPE_CHECKING:
    from .layout import RunDir


class ForecastFiles:
    """The forecast files of one run directory."""

    def __init__(self, run: "RunDir"):
        self.run = run
        self.dir = run.root / "forecast"

    @property
    def rows_path(self) -> Path: return self.dir / "forecast.jsonl"
    @property
    def summary_path(self) -> Path: return self.dir / "summary.json"

    def journal_path(self, inputs: Inputs) -> Path:
        return self.dir / f"journal-{digest(inputs.values)[:12]}.jsonl"

    def journal(self, inputs: Inputs) -> EditJournal:
        """The journal of finished edits for forecast inputs ``inputs``, holding what an interrupted run finished."""
        return EditJournal(self.journal_path(inputs))

    def save(self, summary: ForecastSummary, rows: list[ForecastRow]) -> None:
        """forecast.jsonl then summary.json, each atomically; the journal of these inputs goes (an
        interrupted forecast of other inputs keeps its own, to resume when it is rerun)."""
        with atomic_open(self.rows_path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(row.model_dump_json() + "\n")
        write_json(self.summary_path, summary.model_dump(mode="json"))
        self.journal_path(summary.inputs).unlink(missing_ok=True)

    def exists(self) -> bool:
        return self.summary_path.is_file()

    def load(self) -> tuple[ForecastSummary, list[ForecastRow]]:
        """The summary and rows.

        Raises:
            ArtifactError: absent, unreadable or invalid (the message names the file and line).
        """
        fix = f"rerun `gradcouple forecast --run {self.run.root} ...`."
        return read_model(self.summary_path, ForecastSummary, fix), read_lines(self.rows_path, ForecastRow, fix)

    @staticmethod
    def stale(summary: ForecastSummary, manifest: Manifest) -> list[str]:
        """What changed since the forecast ``summary`` was made ([] when its gradients are this run's)."""
        now = Inputs(values={"gradients": manifest.fingerprint()})
        return stale_inputs(Inputs(values={k: v for k, v in summary.inputs.values.items() if k in now.values}), now)


__all__ = ["ForecastFiles"]
