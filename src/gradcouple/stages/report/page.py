"""The report page: ``templates/index.html.j2`` rendered with autoescaping; CSS, the page's own
script (``templates/report.js``) and plotly.js (``plotly.offline.get_plotlyjs()``, once, in the
head) are inlined, so the file opens offline.
"""

from __future__ import annotations

import json
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import plotly.io as pio
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from plotly.offline import get_plotlyjs

from ...config import RunConfig
from ...metrics import DEFINITIONS
from ...runinfo import human_bytes
from .figures import benchmark_scatter, distribution, heatmap, layer_chart, ripple_scatter, sweep_figure
from .load import LoadedRun
from .summary import stale_ripple_advice

VERSIONED = ("gradcouple", "torch", "transformers", "numpy", "scipy", "plotly", "pydantic", "jinja2")
PLOT_CONFIG = {"responsive": True, "displaylogo": False}


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


def hbytes(x: Optional[float]) -> str:
    """A size in bytes, binary units only: '1.5 KiB'."""
    return "—" if x is None else human_bytes(x)


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


def source_name(source: Optional[str]) -> str:
    """Where a model came from, as the page shows it: a file's or directory's name (not its absolute
    path, which belongs to one machine), a Hub id as it is."""
    if not source:
        return "—"
    p = Path(source)
    return p.name if p.is_absolute() or p.exists() else source


def sortval(x: Any) -> str:
    """The ``data-v`` sort key of a table cell: numbers as they are, bools as 1/0, None as ''."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "1" if x else "0"
    if isinstance(x, (int, float)):
        return repr(x) if math.isfinite(float(x)) else ""
    return str(x)


def environment() -> Environment:
    """The Jinja environment of the report templates: autoescaping on, undefined names are errors."""
    env = Environment(loader=PackageLoader(__package__), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=num, nbytes=nbytes, hbytes=hbytes, secs=secs, short=short, device=device,
                       interval=interval, correlation=correlation, sortval=sortval, source_name=source_name)
    return env


def build_figures(r: LoadedRun, max_heatmap: int) -> tuple[dict[str, Any], int]:
    """The page's plotly figures by name (those without data left out), and the pieces the heatmap shows."""
    hm, shown = heatmap(r, max_heatmap)
    figs: dict[str, Any] = {"heatmap": hm, "distribution": distribution(r), "layers": layer_chart(r)}
    if r.ripple is not None and r.measurements:
        figs["ripple"] = ripple_scatter(r)
    elif r.benchmark is not None:
        figs["ripple"] = benchmark_scatter(r)
    figs["sweep"] = sweep_figure(r)
    return {k: v for k, v in figs.items() if v is not None}, shown


def embedded_figures(r: LoadedRun, max_heatmap: int) -> tuple[dict[str, Markup], int]:
    """Each figure as an HTML fragment (a div and its ``Plotly.newPlot`` call, no plotly.js), and
    the pieces the heatmap shows. The page loads plotly.js once, in its head."""
    figs, shown = build_figures(r, max_heatmap)
    out = {name: Markup(pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"fig-{name}",
                                    config=PLOT_CONFIG))
           for name, fig in figs.items()}
    return out, shown


def versions(r: LoadedRun) -> list[tuple[str, str]]:
    """(what, version) of the report's Python and packages, and what the extraction recorded."""
    out = [("python", platform.python_version())]
    for pkg in VERSIONED:
        try:
            out.append((pkg, metadata.version(pkg)))
        except metadata.PackageNotFoundError:
            out.append((pkg, "not installed"))
    out.append(("gradcouple at extraction", r.manifest.package_version))
    t = r.manifest.timing
    if t and t.device.torch:
        out.append(("torch at extraction", t.device.torch))
    rip = r.ripple or r.benchmark
    if rip and rip.device.torch:
        out.append(("torch at ripple", rip.device.torch))
    return out


def stage_times(r: LoadedRun) -> list[tuple[str, Optional[float]]]:
    """(stage, wall seconds) of every stage that ran, read from its own output."""
    t = r.manifest.timing
    out: list[tuple[str, Optional[float]]] = []
    if t:
        out += [("load model", t.load_seconds), ("extract", t.extract_seconds)]
    out.append(("couple", r.stats.seconds))
    rip = r.ripple or r.benchmark
    if rip:
        out.append(("ripple", rip.seconds))
    return out


#: edits whose top pieces the report lists (the rest are in forecast/forecast.jsonl)
FORECAST_EDITS = 20


def forecast_view(r: LoadedRun) -> Optional[dict]:
    """The latest forecast for the page: its summary, and per edit (the first FORECAST_EDITS) the top
    pieces of its first predictor, rank order; None without a current forecast."""
    if r.forecast is None:
        return None
    s, rows = r.forecast
    name = s.predictors[0]
    edits = []
    for e in s.edits[:FORECAST_EDITS]:
        top = sorted((x for x in rows if x.edit == e.id and x.predictor == name and x.rank <= s.top_k), key=lambda x: x.rank)
        edits.append({"edit": e, "rows": top})
    return {"s": s, "predictor": name, "edits": edits, "more": max(0, len(s.edits) - FORECAST_EDITS)}


def config_json(r: LoadedRun) -> str:
    """The resolved configuration: the run's config.json, else the extraction's recorded sections."""
    cfg = r.config.model_dump(mode="json") if r.config else r.manifest.config
    return json.dumps(cfg, indent=2, ensure_ascii=False)


def render(r: LoadedRun, summary: dict, cfg: RunConfig) -> str:
    """The whole page as one self-contained HTML string (opens offline)."""
    env = environment()
    figs, shown = embedded_figures(r, cfg.report.max_heatmap)
    src = lambda name: Markup(env.loader.get_source(env, name)[0])  # noqa: E731
    return env.get_template("index.html.j2").render(
        s=summary, run_dir=str(r.run.root), css=src("report.css"), script=src("report.js"),
        plotlyjs=Markup(get_plotlyjs()), figs=figs, definitions=DEFINITIONS, full=r.full,
        heatmap={"shown": shown, "total": len(r.records), "max": cfg.report.max_heatmap},
        layers=r.stats.layers, ripple=r.ripple, benchmark=r.benchmark, pairs=r.pairs,
        pairs_different_answer=r.pairs_different_answer, versions=versions(r), stage_times=stage_times(r),
        config_json=config_json(r), run_bytes=sum(b for _, b in r.files), n_files=len(r.files),
        stale_advice=stale_ripple_advice(r), forecast=forecast_view(r))
