"""The report page: ``templates/index.html.j2`` rendered with autoescaping, CSS and plotly.js inlined."""

from __future__ import annotations

import math
from typing import Any, Optional

import plotly.io as pio
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from ..config import RunConfig
from ..metrics import DEFINITIONS
from ..runinfo import human_bytes
from .figures import distribution, heatmap, ripple_scatter
from .load import LoadedRun

TOP_PAIRS_HTML = 25


def num(x: Any, nd: int = 4) -> str:
    """Numbers for people: '—' for None or non-finite, yes/no for bools, thousands separators for ints."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{float(x):.{nd}f}" if math.isfinite(float(x)) else "—"


def nbytes(x: Optional[float]) -> str:
    """A size in bytes, binary units and exact: '1.5 KiB (1,536 B)'."""
    return "—" if x is None else f"{human_bytes(x)} ({int(x):,} B)"


def secs(x: Optional[float]) -> str:
    """A wall time in seconds."""
    return "—" if x is None else f"{float(x):.2f} s"


def short(s: Optional[str], n: int) -> str:
    """``s`` on one line, cut to ``n`` characters with an ellipsis."""
    s = " ".join(str(s or "").split())
    return s if len(s) <= n else s[: n - 1] + "…"


def device(d: Optional[dict]) -> str:
    """A device dict (``DeviceInfo`` fields) as one phrase: the GPU, or the CPU and its threads."""
    if not d or not d.get("device"):
        return "—"
    if d.get("gpu"):
        return f"GPU: {d['gpu']} ({d['device']})"
    return f"CPU only, no GPU ({d.get('cpu')}, {d.get('threads')} threads)"


def interval(d, nd: int = 3) -> str:
    """An ``Interval`` (model or dict) as 'estimate [low, high]' (the brackets left out when there is no interval)."""
    d = d.model_dump() if hasattr(d, "model_dump") else d
    if not d or d.get("estimate") is None:
        return "—"
    if d.get("low") is None or d.get("high") is None:
        return num(d["estimate"], nd)
    return f"{num(d['estimate'], nd)} [{num(d['low'], nd)}, {num(d['high'], nd)}]"


def correlation(c) -> str:
    """A Correlation (dict or model) as 'value [low, high]'."""
    d = c if isinstance(c, dict) else (c.model_dump() if c is not None else {})
    if d.get("value") is None:
        return "—"
    if d.get("ci_low") is None:
        return num(d["value"], 3)
    return f"{num(d['value'], 3)} [{num(d['ci_low'], 3)}, {num(d['ci_high'], 3)}]"


def environment() -> Environment:
    """The Jinja environment of the report templates: autoescaping on, undefined names are errors."""
    env = Environment(loader=PackageLoader("gradcouple.report"), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=num, nbytes=nbytes, secs=secs, short=short, device=device, interval=interval,
                       correlation=correlation)
    return env


def embedded_figures(r: LoadedRun, max_heatmap: int) -> tuple[dict[str, Markup], int]:
    """Each figure as an HTML fragment (plotly.js embedded in the first only), and the pieces the heatmap shows."""
    hm, shown = heatmap(r, max_heatmap)
    figs = {"heatmap": hm, "distribution": distribution(r)}
    if r.ripple is not None and r.measurements:
        figs["ripple"] = ripple_scatter(r)
    out = {name: Markup(pio.to_html(fig, full_html=False, include_plotlyjs=k == 0, div_id=f"fig-{name}",
                                    config={"responsive": True}))
           for k, (name, fig) in enumerate(figs.items())}
    return out, shown


def render(r: LoadedRun, summary: dict, cfg: RunConfig) -> str:
    """The whole page as one self-contained HTML string (opens offline)."""
    env = environment()
    figs, shown = embedded_figures(r, cfg.report.max_heatmap)
    css = Markup(env.loader.get_source(env, "report.css")[0])
    return env.get_template("index.html.j2").render(
        s=summary, run_dir=str(r.run.root), css=css, figs=figs, definitions=DEFINITIONS, full=r.full,
        heatmap={"shown": shown, "total": len(r.records), "max": cfg.report.max_heatmap},
        ripple=r.ripple, benchmark=r.benchmark, pairs=r.pairs[:TOP_PAIRS_HTML], pairs_different_answer=r.pairs_different_answer[:TOP_PAIRS_HTML])
