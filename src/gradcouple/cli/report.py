"""``gradcouple report``: one offline HTML page and summary.json from a run directory."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..runinfo import human_bytes
from .options import ConfigOpt, RunDirOpt, console, gradsim_label, interval, num, opt, print_path, summary_table

EPILOG = """Examples:

  gradcouple report --run runs/musique

  gradcouple report --run runs/big --max-heatmap 500

  gradcouple report --run runs/musique --open

  xdg-open "$(gradcouple report --run runs/musique)"
"""


def report(
    run: RunDirOpt,
    max_heatmap: Annotated[Optional[int], opt("report.max_heatmap", "--max-heatmap")] = None,
    open_page: Annotated[bool, typer.Option("--open", help="Open the page in the default browser when one is available; otherwise say where it is.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Write RUN/report/index.html (self-contained, opens offline) and RUN/report/summary.json."""
    from .. import api  # deferred: torch and transformers (the stages), so `--help` stays fast
    from ..stages.report import open_in_browser

    res = api.report(run, config=config, max_heatmap=max_heatmap)
    h = res.headline
    rows = [("pieces", h.n_pieces), (gradsim_label(h.mode), num(h.mean_gradsim)),
            ("same / cross question", f"{num(h.same_question_mean)} / {num(h.cross_question_mean)}")]
    if h.ripple_done:
        rows.append(("ripple Spearman's rho, coupling / first order",
                     f"{interval(h.ripple_spearman_coupling)} / {interval(h.ripple_spearman_first_order)}"))
    else:
        rows.append(("ripple", "not run"))
    rows += [("device", h.gpu or "CPU (no GPU)"), ("page", human_bytes(res.index_html.stat().st_size)),
             ("time", f"{res.seconds:.1f} s")]
    console.print(summary_table("report", rows))
    console.print(f"summary: {res.summary_json}", highlight=False)
    if open_page:
        if open_in_browser(res.index_html):
            console.print(f"opened {res.index_html.resolve().as_uri()} in the default browser", highlight=False,
                          soft_wrap=True)
        else:
            console.print(f"no graphical browser here; open {res.index_html.resolve().as_uri()} in one "
                          "(the page is self-contained: copy it anywhere)", highlight=False, soft_wrap=True)
    print_path(res.index_html)
