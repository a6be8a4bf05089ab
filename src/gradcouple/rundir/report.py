"""``RUN/report/``: the report page and its summary.

    index.html      one self-contained page (plotly.js embedded once), opens offline
    summary.json    ReportSummary: the nine sections; generated_files lists every file of the run,
                    summary.json itself included with its final size
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..artifacts import ReportSummary
from ..io import atomic_open
from .read import read_model

if TYPE_CHECKING:
    from .layout import RunDir


class ReportFiles:
    """The report files of one run directory."""

    def __init__(self, run: "RunDir"):
        self.run = run
        self.dir = run.root / "report"

    @property
    def index_path(self) -> Path: return self.dir / "index.html"
    @property
    def summary_path(self) -> Path: return self.dir / "summary.json"

    def own_files(self) -> set[str]:
        """The report's two outputs, relative to the run directory."""
        return {self.run.relative(self.index_path), self.run.relative(self.summary_path)}

    def save_index(self, html: str) -> None:
        with atomic_open(self.index_path, "w", encoding="utf-8") as fh:
            fh.write(html)

    def save_summary(self, summary: dict) -> ReportSummary:
        """Write summary.json atomically, its ``generated_files`` listing every file of the run now, itself
        included with its exact final size in bytes. Call it after index.html is written, so that file
        is listed with its final size too. ``summary`` is validated against :class:`ReportSummary` first.

        Raises:
            pydantic.ValidationError: ``summary`` does not have the schema (a bug in the report stage).
        """
        own = self.run.relative(self.summary_path)
        entry = {"path": own, "bytes": 0}
        files = sorted([{"path": p, "bytes": b} for p, b in self.run.files() if p != own] + [entry],
                       key=lambda f: f["path"])
        section = {**summary["generated_files"], "files": files}
        summary.update(generated_files=section)
        while True:  # the file's size is written in it: iterate to the fixed point (sizes only grow, so this ends)
            section.update(n_files=len(files), total_bytes=sum(f["bytes"] for f in files))
            text = json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
            if len(text.encode("utf-8")) == entry["bytes"]:
                break
            entry["bytes"] = len(text.encode("utf-8"))
        checked = ReportSummary.model_validate(summary)
        with atomic_open(self.summary_path, "w", encoding="utf-8") as fh:
            fh.write(text)
        return checked

    def load_summary(self) -> ReportSummary:
        """Raises: ArtifactError (absent, unreadable or not of the schema; the message names the field)."""
        return read_model(self.summary_path, ReportSummary, f"rerun `gradcouple report --run {self.run.root}`.")


__all__ = ["ReportFiles"]
