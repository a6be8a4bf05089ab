"""``gradcouple report``: one offline HTML page and summary.json from a run directory."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import app
from ._common import ConfigOpt, RunDirOpt, build_config, console, handle_errors, print_path, summary_table

EXAMPLES = """Examples:

  gradcouple report --run runs/musique

  gradcouple report --run runs/big --max-heatmap 500

  xdg-open "$(gradcouple report --run runs/musique)"
"""


def _fmt(x, nd: int = 3) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


@app.command(epilog=EXAMPLES)
@handle_errors
def report(
    run: RunDirOpt,
    max_heatmap: Annotated[Optional[int], typer.Option("--max-heatmap", help="Largest number of pieces drawn in the heatmap (default 200).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Write RUN/report/index.html (self-contained, opens offline) and RUN/report/summary.json."""
    from ..report import report as run_report
    from ..runinfo import human_bytes

    cfg = build_config(config, run, {"report.max_heatmap": max_heatmap})
    res = run_report(cfg, run)
    s = res.summary
    cp, ready, perf = s["cross_pot_analysis"], s["experiment_readiness"], s["gpu_performance"]
    rows = [("pieces", s["knowledge_pieces"]["count"]),
            ("mean GradSim", _fmt(s["coupling_analysis"].get("mean"), 4)),
            ("same / cross question", f"{_fmt(cp['same_question']['mean'], 4)} / {_fmt(cp['cross_question']['mean'], 4)}")]
    if ready["ripple_done"]:
        rows.append(("ripple Spearman (coupling / first order)",
                     f"{_fmt(ready['ripple_spearman_coupling_mean'])} / {_fmt(ready['ripple_spearman_first_order_mean'])}"))
    else:
        rows.append(("ripple", "not run"))
    rows += [("device", perf["gpu"] or "CPU (no GPU)"),
             ("page", human_bytes(res.index_html.stat().st_size)),
             ("time", f"{res.seconds:.1f} s")]
    console.print(summary_table("report", rows))
    console.print(f"summary: {res.summary_json}", highlight=False)
    print_path(res.index_html)
