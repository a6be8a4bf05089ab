"""The ``report`` stage: one self-contained HTML page and ``summary.json`` from a run directory.

Reads the run through :class:`~gradcouple.rundir.RunDir` only (gradient manifest, current
coupling, pieces, saved config, optional current ripple results) and writes
``RUN/report/index.html`` (plotly figures with plotly.js embedded once, so the page opens
offline) and ``RUN/report/summary.json`` (the nine sections of :data:`SECTIONS`).
"""

from __future__ import annotations

import os
import time
import webbrowser
from pathlib import Path

from pydantic import BaseModel

from ...config import RunConfig
from ...rundir import locked
from .load import LoadedRun, load_run
from .page import render
from .summary import Headline, headline, summarize

SECTIONS = ("metadata", "knowledge_pieces", "gradient_analysis", "coupling_analysis", "high_coupling_pairs",
            "cross_pot_analysis", "generated_files", "gpu_performance", "experiment_readiness")


class ReportResult(BaseModel):
    """Where the outputs are, the summary written to summary.json, the wall time (seconds) and the headline numbers."""

    out_dir: Path
    index_html: Path
    summary_json: Path
    summary: dict
    seconds: float
    headline: Headline


def build_summary(run_dir: str | Path) -> dict:
    """The nine-section summary (:data:`SECTIONS`) of a run directory, as JSON-safe data.

    Log-probs are in nats, sizes in bytes, times in seconds; non-finite numbers are None.
    ``generated_files`` lists every file of the run except the report's own two outputs, which
    :func:`report` adds. Ripple figures are None when ripple was not run.

    Raises:
        ArtifactError: no complete extraction; coupling files missing (the message names the
            file and ``gradcouple couple --run``); stale coupling or ripple results.
        DataError: an unreadable pieces.jsonl.
        ConfigError: an unreadable config.json.
    """
    return summarize(load_run(run_dir))


def render_html(run_dir: str | Path, summary: dict, cfg: RunConfig) -> str:
    """The report page of ``run_dir`` as one self-contained HTML string (plotly.js embedded once).

    Shows a headline panel (model, |θ|, pieces, questions, datasets, device, throughput, peak
    memory, bytes on disk, wall time per stage, and whether coupling predicts ripple, with its
    interval); the GradSim heatmap (up to ``cfg.report.max_heatmap`` pieces, beyond that the
    pieces of the most coupled pairs, with a note) with a question/hop vs clustering order
    toggle; the GradSim distribution by same question / cross question / same answer; each
    target layer's contribution to GradSim; sortable, filterable tables of the most coupled
    pairs; the ripple scatter and correlation table of either ripple mode with a per-edit table;
    the resolved config and versions (collapsible) and every metric's definition once.

    Raises:
        ArtifactError, DataError, ConfigError: as :func:`build_summary`.
    """
    return render(load_run(run_dir), summary, cfg)


@locked("report")
def report(cfg: RunConfig, run_dir: str | Path) -> ReportResult:
    """Write ``run_dir/report/index.html`` and ``run_dir/report/summary.json``, both atomically.

    summary.json's ``generated_files`` lists every file of the run, both report files included
    with their final sizes in bytes.

    Raises:
        ArtifactError, DataError, ConfigError: as :func:`build_summary`.
    """
    t0 = time.perf_counter()
    loaded = load_run(run_dir)
    summary = summarize(loaded)
    run = loaded.run
    run.report.save_index(render(loaded, summary, cfg))
    summary["experiment_readiness"]["report_written"] = True
    run.report.save_summary(summary)
    return ReportResult(out_dir=run.report.dir, index_html=run.report.index_path, summary_json=run.report.summary_path,
                        summary=summary, seconds=time.perf_counter() - t0, headline=headline(loaded))


def open_in_browser(path: str | Path) -> bool:
    """Open the page ``path`` in the default web browser (:mod:`webbrowser`), without waiting for it.

    Returns False, opening nothing, when no graphical browser is available: none registered, or
    only a console one (lynx, w3m, ...) that cannot draw the figures, as on a server without a
    display; a browser named in ``$BROWSER`` always counts.
    """
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        return False
    if type(browser) is webbrowser.GenericBrowser and not os.environ.get("BROWSER"):
        return False  # a console browser would take over the terminal
    try:
        return bool(browser.open(Path(path).resolve().as_uri()))
    except (OSError, webbrowser.Error):
        return False


__all__ = ["SECTIONS", "ReportResult", "Headline", "LoadedRun", "load_run", "build_summary", "render_html", "report",
           "open_in_browser"]
