"""The report's plotly figures: GradSim heatmap, same- vs cross-question distribution, ripple scatter."""

from __future__ import annotations

import html
import re
from typing import Optional

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative

from ..artifacts import Measurement
from .load import LoadedRun

HIST_BINS = 100
MAX_TICK_LABELS = 60  # more pieces than this: tick labels would overlap, hover still names each cell
MAX_QUESTION_LINES = 150


def plotly_text(s: str) -> str:
    """``s`` escaped for plotly's pseudo-HTML (hover labels, legend names), so it shows verbatim."""
    return html.escape(s, quote=False)


def _fmt(x: Optional[float], nd: int = 4) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _short(s: str, n: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def natural_key(s: str) -> list:
    """Sort key that orders digit runs by value: 'q2' before 'q10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def heatmap_order(r: LoadedRun) -> list[int]:
    """Piece indices by question id (natural sort), then hop (the whole question last), then id."""
    recs = r.records
    return sorted(range(len(recs)), key=lambda i: (natural_key(recs[i].question_id), recs[i].hop is None,
                                                   recs[i].hop or 0, natural_key(recs[i].id)))


def heatmap_cells(r: LoadedRun, shown: list[int]) -> list[list[Optional[float]]]:
    """GradSim of the shown pieces, rows and columns in ``shown`` order; in top-k mode only the
    cells (row piece, one of its kept neighbours) hold a value, every other cell is None."""
    if r.full:
        t = torch.tensor(shown, dtype=torch.long)
        return r.cosine[t][:, t].numpy().round(4).tolist()
    pos = {p: k for k, p in enumerate(shown)}
    z: list[list[Optional[float]]] = [[None] * len(shown) for _ in shown]
    for a, i in enumerate(shown):
        for j, c in zip(r.indices[i].tolist(), r.cosine[i].tolist()):
            if j in pos:
                z[a][pos[j]] = round(c, 4)
    return z


def heatmap(r: LoadedRun, max_n: int) -> tuple[go.Figure, int]:
    """The GradSim heatmap of the first ``max_n`` pieces in :func:`heatmap_order`, and how many it shows."""
    recs, shown = r.records, heatmap_order(r)[:max_n]
    n = len(shown)
    labels = [plotly_text(f"{recs[i].id} · {_short(recs[i].prompt, 90)} → {_short(recs[i].answer, 40)}") for i in shown]
    fig = go.Figure(go.Heatmap(
        z=heatmap_cells(r, shown), x=labels, y=labels, colorscale="RdBu", reversescale=True, zmin=-1, zmax=1, zmid=0,
        colorbar={"title": {"text": "GradSim"}},
        hovertemplate="<b>row</b> %{y}<br><b>col</b> %{x}<br>GradSim = %{z:.4f}<extra></extra>"))
    axis = {"type": "category", "tickmode": "array", "tickvals": labels, "tickfont": {"size": 9},
            "ticktext": [plotly_text(recs[i].id) for i in shown], "showticklabels": n <= MAX_TICK_LABELS}
    size = max(520, min(1000, 300 + 6 * n))
    fig.update_layout(title={"text": f"GradSim between pieces ({n} of {len(recs)} shown, ordered by question, then hop)"},
                      xaxis=axis, yaxis={**axis, "autorange": "reversed"}, width=size + 120, height=size,
                      template="plotly_white", shapes=_question_lines([recs[i].question_id for i in shown]),
                      margin={"l": 40, "r": 20, "t": 60, "b": 40})
    return fig, n


def _question_lines(qids: list[str]) -> list[dict]:
    # thin lines between questions make the within-question blocks stand out
    cuts = [k for k in range(1, len(qids)) if qids[k] != qids[k - 1]]
    if len(cuts) > MAX_QUESTION_LINES:
        return []
    line = {"color": "rgba(0,0,0,0.35)", "width": 0.6}
    return [s for k in cuts for s in (
        {"type": "line", "xref": "x", "yref": "paper", "x0": k - 0.5, "x1": k - 0.5, "y0": 0, "y1": 1, "line": line},
        {"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": k - 0.5, "y1": k - 0.5, "line": line})]


def distribution(r: LoadedRun) -> go.Figure:
    """Density histograms of off-diagonal GradSim (each known pair once), same- vs cross-question."""
    i, j, v = r.known_pairs()
    same = r.same_question_mask(i, j)
    edges = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    centers, width = (edges[:-1] + edges[1:]) / 2, float(edges[1] - edges[0])
    fig = go.Figure()
    for name, mask, color in (("same question", same, "#d62728"), ("cross question", ~same, "#1f77b4")):
        vals = v[mask].clamp(-1.0, 1.0).numpy()
        if not vals.size:
            continue
        counts = np.histogram(vals, bins=edges)[0]
        fig.add_trace(go.Bar(
            x=centers.round(4), y=(counts / (vals.size * width)).round(5), width=width, opacity=0.6, marker_color=color,
            name=f"{name} ({vals.size:,} pairs)", customdata=counts,
            hovertemplate=f"{name}<br>GradSim ≈ %{{x:.2f}}<br>%{{customdata}} pairs<br>density %{{y:.3f}}<extra></extra>"))
    fig.update_layout(barmode="overlay", template="plotly_white", height=420,
                      title={"text": "Off-diagonal GradSim: same-question vs cross-question pairs (each pair once)"},
                      xaxis={"title": {"text": "GradSim (cosine)"}, "range": [-1, 1]},
                      yaxis={"title": {"text": "density (each group integrates to 1)"}},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def ripple_scatter(r: LoadedRun) -> go.Figure:
    """Measured vs predicted log-prob change (nats) of every other piece per edit; a menu switches
    between the coupling and the first-order prediction. Diamonds: the edited piece's own question."""
    groups: dict[int, list[Measurement]] = {}
    for m in r.measurements:
        groups.setdefault(m.edit, []).append(m)
    fig = go.Figure([_edit_trace(k, e, rows) for k, (e, rows) in enumerate(sorted(groups.items()))])
    xs_c = [[m.predicted_coupling for m in rows] for _, rows in sorted(groups.items())]
    xs_f = [[m.predicted_first_order for m in rows] for _, rows in sorted(groups.items())]
    pooled = r.ripple.pooled if r.ripple else None
    t_c = _ripple_title("coupling", pooled.spearman_coupling if pooled else None)
    t_f = _ripple_title("first-order", pooled.spearman_first_order if pooled else None)
    x_c, x_f = "predicted Δlog P (coupling predictor, nats)", "predicted Δlog P = ⟨g_j, Δθ⟩ (nats)"
    fig.update_layout(
        template="plotly_white", height=520, title={"text": t_c}, xaxis={"title": {"text": x_c}, "zeroline": True},
        yaxis={"title": {"text": "measured Δlog P (nats)"}, "zeroline": True},
        updatemenus=[{"type": "dropdown", "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "top", "buttons": [
            {"label": "coupling prediction", "method": "update",
             "args": [{"x": xs_c}, {"title.text": t_c, "xaxis.title.text": x_c}]},
            {"label": "first-order prediction", "method": "update",
             "args": [{"x": xs_f}, {"title.text": t_f, "xaxis.title.text": x_f}]}]}])
    return fig


def _edit_trace(k: int, e: int, rows: list[Measurement]) -> go.Scatter:
    name = plotly_text(f"edit {e}: {rows[0].edited_id}")
    return go.Scatter(
        x=[m.predicted_coupling for m in rows], y=[m.measured for m in rows], mode="markers", name=name,
        marker={"color": qualitative.Dark24[k % len(qualitative.Dark24)], "size": 7, "opacity": 0.8,
                "symbol": ["diamond" if m.same_question else "circle" for m in rows]},
        customdata=[[plotly_text(m.piece_id), "same" if m.same_question else "cross", _fmt(m.cosine),
                     _fmt(m.predicted_coupling), _fmt(m.predicted_first_order)] for m in rows],
        hovertemplate=("piece %{customdata[0]} (%{customdata[1]}-question)<br>GradSim to edited %{customdata[2]}"
                       "<br>predicted (coupling) %{customdata[3]}<br>predicted (first order) %{customdata[4]}"
                       "<br>measured Δlog P %{y:.4f} nats<extra>" + name + "</extra>"))


def _ripple_title(which: str, rho: Optional[float]) -> str:
    return f"Ripple: {which} prediction vs measured Δlog P — pooled Spearman's ρ = {_fmt(rho, 3)}"
