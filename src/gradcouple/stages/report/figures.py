"""The report's plotly figures: GradSim heatmap (question/hop and clustering order), GradSim
distribution, per-layer contributions, and the ripple scatters of both ripple modes.

Every figure is a plain :class:`plotly.graph_objects.Figure`; what the page's script needs beyond
the traces (the two heatmap orders) travels in ``layout.meta``.
"""

from __future__ import annotations

import html
import re
import textwrap
from typing import Optional

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from ...artifacts import Measurement, TestMeasurement
from .load import LoadedRun

HIST_BINS = 100
MAX_TICK_LABELS = 60  # more pieces than this: piece ids would overlap, so questions are labelled instead
MAX_QUESTION_LINES = 150
HOVER_WIDTH = 80  # characters per hover line
HOVER_PROMPT = 400  # characters of a prompt shown on hover
MAX_SCATTER_POINTS = 20000  # per figure; a benchmark over many edits is subsampled evenly (noted in the title)
COLORS = qualitative.Dark24


def plotly_text(s: str) -> str:
    """``s`` escaped for plotly's pseudo-HTML (hover labels, legend names), so it shows verbatim."""
    return html.escape(s, quote=False)


def _fmt(x: Optional[float], nd: int = 4) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _short(s: str, n: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _wrapped(s: str, n: int = HOVER_PROMPT) -> str:
    """``s`` cut to ``n`` characters, escaped, broken into hover lines of :data:`HOVER_WIDTH`."""
    return "<br>".join(plotly_text(line) for line in textwrap.wrap(_short(s, n), HOVER_WIDTH) or [""])


def natural_key(s: str) -> list:
    """Sort key that orders digit runs by value: 'q2' before 'q10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def heatmap_order(r: LoadedRun, pieces: Optional[list[int]] = None) -> list[int]:
    """Piece indices (all, or ``pieces``) by question id (natural sort), then hop (the whole question last), then id."""
    recs = r.records
    pool = range(len(recs)) if pieces is None else pieces
    return sorted(pool, key=lambda i: (natural_key(recs[i].question_id), recs[i].hop is None,
                                       recs[i].hop or 0, natural_key(recs[i].id)))


def best_partner(r: LoadedRun) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) each piece's highest GradSim to another piece, and that piece's index (-1 with no other piece)."""
    n = len(r.records)
    if n < 2:
        return torch.full((n,), float("nan"), dtype=torch.float64), torch.full((n,), -1, dtype=torch.long)
    if r.full:
        c = r.cosine.double().clone()
        c.fill_diagonal_(-float("inf"))
        v, j = c.max(dim=1)
        return v, j
    return r.cosine[:, 0].double(), r.indices[:, 0]


def heatmap_selection(r: LoadedRun, max_n: int) -> list[int]:
    """The pieces the heatmap draws, in question/hop order: all of them when N <= ``max_n``, else
    the ``max_n`` pieces of the most coupled pairs (a piece enters at its highest GradSim to any
    other piece, which is where it first appears in the list of pairs sorted by GradSim)."""
    n = len(r.records)
    if n <= max_n:
        return heatmap_order(r)
    best, _ = best_partner(r)
    ranked = sorted(range(n), key=lambda i: (-float(best[i]), i))
    return heatmap_order(r, ranked[:max_n])


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


def cluster_order(z: list[list[Optional[float]]]) -> list[int]:
    """Positions 0..n-1 of ``z`` in hierarchical-clustering order: average linkage on 1 − GradSim
    with optimal leaf ordering (scipy.cluster.hierarchy). Unknown cells (top-k mode) count as
    GradSim 0; a pair's distance is the mean of its two cells, so it is symmetric."""
    n = len(z)
    if n < 3:
        return list(range(n))
    c = np.array([[0.0 if v is None else v for v in row] for row in z], dtype=np.float64)
    d = np.clip(1.0 - (c + c.T) / 2, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    return leaves_list(linkage(squareform(d, checks=False), method="average", optimal_ordering=True)).tolist()


def heatmap(r: LoadedRun, max_n: int) -> tuple[go.Figure, int]:
    """The GradSim heatmap of :func:`heatmap_selection` in question/hop order, and how many pieces it shows.

    ``layout.meta`` holds ``orders``: for 'question' and 'cluster', the drawn positions in that
    order (the page's toggle permutes rows and columns with it), and ``lines`` (the question
    separators, drawn in question order only).
    """
    recs, shown = r.records, heatmap_selection(r, max_n)
    n = len(shown)
    labels = [f"<b>{plotly_text(recs[i].id)}</b><br>{_wrapped(recs[i].prompt)}<br>→ <b>{_wrapped(recs[i].answer, 120)}</b>"
              for i in shown]
    z = heatmap_cells(r, shown)
    lines = _question_lines([recs[i].question_id for i in shown])
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=labels, colorscale="RdBu", reversescale=True, zmin=-1, zmax=1, zmid=0,
        colorbar={"title": {"text": "GradSim"}}, hoverongaps=False,
        hovertemplate="<b>row</b> %{y}<br><br><b>column</b> %{x}<br><br>GradSim = %{z:.4f}<extra></extra>"))
    axis = {"type": "category", "tickmode": "array", "tickvals": labels, "tickfont": {"size": 9},
            "ticktext": tick_texts([recs[i].id for i in shown], [recs[i].question_id for i in shown])}
    size = max(520, min(1000, 300 + 6 * n))
    fig.update_layout(title={"text": f"GradSim between pieces ({n} of {len(recs)} shown)"},
                      xaxis=axis, yaxis={**axis, "autorange": "reversed"}, width=size + 120, height=size,
                      template="plotly_white", shapes=lines, margin={"l": 40, "r": 20, "t": 60, "b": 40},
                      hoverlabel={"align": "left"},
                      meta={"orders": {"question": list(range(n)), "cluster": cluster_order(z)}, "lines": lines})
    return fig, n


def tick_texts(ids: list[str], qids: list[str]) -> list[str]:
    """One tick label per drawn piece: its id when they fit (:data:`MAX_TICK_LABELS`), else its question's
    id at the first piece of each question (every k-th question when even those would overlap) and ''."""
    if len(ids) <= MAX_TICK_LABELS:
        return [plotly_text(i) for i in ids]
    starts = [k for k in range(len(qids)) if k == 0 or qids[k] != qids[k - 1]]
    every = -(-len(starts) // MAX_TICK_LABELS)
    keep = set(starts[::every])
    return [plotly_text(_short(q, 24)) if k in keep else "" for k, q in enumerate(qids)]


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
    """Density histograms of off-diagonal GradSim (each known pair once): same-question and
    cross-question pairs, with same-answer pairs (any question) overlaid."""
    i, j, v = r.known_pairs()
    same = r.same_question_mask(i, j)
    answer = r.same_answer_mask(i, j)
    edges = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    centers, width = (edges[:-1] + edges[1:]) / 2, float(edges[1] - edges[0])
    fig = go.Figure()
    for name, mask, color in (("same question", same, "#d62728"), ("cross question", ~same, "#1f77b4"),
                              ("same answer", answer, "#2ca02c")):
        vals = v[mask].clamp(-1.0, 1.0).numpy()
        if not vals.size:
            continue
        counts = np.histogram(vals, bins=edges)[0]
        fig.add_trace(go.Bar(
            x=centers.round(4), y=(counts / (vals.size * width)).round(5), width=width, opacity=0.55, marker_color=color,
            name=f"{name} ({vals.size:,} pairs)", customdata=counts,
            hovertemplate=f"{name}<br>GradSim ≈ %{{x:.2f}}<br>%{{customdata}} pairs<br>density %{{y:.3f}}<extra></extra>"))
    fig.update_layout(barmode="overlay", template="plotly_white", height=420,
                      title={"text": "Off-diagonal GradSim by pair kind (each pair once)"},
                      xaxis={"title": {"text": "GradSim (cosine)"}, "range": [-1, 1]},
                      yaxis={"title": {"text": "density (each group integrates to 1)"}},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def layer_chart(r: LoadedRun) -> Optional[go.Figure]:
    """Stacked bars of each target layer's contribution to GradSim (``DEFINITIONS['layer contribution']``):
    the mean over all pairs, then each of the most coupled pairs; a menu switches to absolute shares.
    None when stats.json has no per-layer parts (couple ran before they were kept)."""
    lc = r.stats.layers
    if lc is None or not lc.names:
        return None
    cats = ["all pairs (mean)"] + [f"#{k}" for k in range(1, len(lc.top_pairs) + 1)]
    who = [f"mean over {lc.n_pairs:,} pairs"] + [plotly_text(f"{p.id_a} ↔ {p.id_b}") for p in lc.top_pairs]
    signed = [[lc.mean_contribution[k]] + [p.contribution[k] for p in lc.top_pairs] for k in range(len(lc.names))]
    shares = []
    for k in range(len(lc.names)):
        row = [lc.abs_share[k]]
        for p in lc.top_pairs:
            tot = sum(abs(c) for c in p.contribution)
            row.append(abs(p.contribution[k]) / tot if tot > 0 else 0.0)
        shares.append(row)
    cos = [f"mean GradSim {sum(lc.mean_contribution):.4f}"] + [f"GradSim {p.cosine:.4f}" for p in lc.top_pairs]
    fig = go.Figure([go.Bar(x=cats, y=[round(v, 6) for v in signed[k]], name=plotly_text(name),
                            marker_color=COLORS[k % len(COLORS)], customdata=list(zip(who, cos)),
                            hovertemplate=(f"<b>{plotly_text(name)}</b><br>%{{x}}: %{{customdata[0]}}<br>"
                                           "%{y:.4f} of %{customdata[1]}<extra></extra>"))
                     for k, name in enumerate(lc.names)])
    t_signed = ("Per-layer contribution to GradSim<br><sub>the mean over all pairs, then the most coupled pairs "
                "(#k: rank in pairs.csv); bars add up to GradSim</sub>")
    t_share = "Per-layer share of |contribution|<br><sub>the mean over all pairs, then the most coupled pairs; bars add up to 1</sub>"
    fig.update_layout(
        barmode="relative", template="plotly_white", height=460, title={"text": t_signed},
        xaxis={"type": "category"}, yaxis={"title": {"text": "contribution to GradSim"}},
        legend={"orientation": "h", "y": -0.12}, margin={"t": 100},
        updatemenus=[{"type": "dropdown", "x": 1.0, "xanchor": "right", "y": 1.02, "yanchor": "bottom", "buttons": [
            {"label": "signed contribution", "method": "update",
             "args": [{"y": [[round(v, 6) for v in row] for row in signed]},
                      {"title.text": t_signed, "yaxis.title.text": "contribution to GradSim"}]},
            {"label": "absolute share", "method": "update",
             "args": [{"y": [[round(v, 6) for v in row] for row in shares]},
                      {"title.text": t_share, "yaxis.title.text": "share of |contribution|"}]}]}])
    return fig


def ripple_scatter(r: LoadedRun) -> go.Figure:
    """Pieces mode: measured vs predicted log-prob change (nats) of every other piece per edit; a
    menu switches between the coupling and the first-order prediction. Diamonds: the edited
    piece's own question."""
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
        template="plotly_white", height=540, title={"text": t_c}, xaxis={"title": {"text": x_c}, "zeroline": True},
        yaxis={"title": {"text": "measured Δlog P (nats)"}, "zeroline": True}, margin={"t": 100},
        updatemenus=[{"type": "dropdown", "x": 1.0, "xanchor": "right", "y": 1.02, "yanchor": "bottom", "buttons": [
            {"label": "coupling prediction", "method": "update",
             "args": [{"x": xs_c}, {"title.text": t_c, "xaxis.title.text": x_c}]},
            {"label": "first-order prediction", "method": "update",
             "args": [{"x": xs_f}, {"title.text": t_f, "xaxis.title.text": x_f}]}]}])
    return fig


def _edit_trace(k: int, e: int, rows: list[Measurement]) -> go.Scatter:
    name = plotly_text(f"edit {e}: {rows[0].edited_id}")
    return go.Scatter(
        x=[m.predicted_coupling for m in rows], y=[m.measured for m in rows], mode="markers", name=name,
        marker={"color": COLORS[k % len(COLORS)], "size": 7, "opacity": 0.8,
                "symbol": ["diamond" if m.same_question else "circle" for m in rows]},
        customdata=[[plotly_text(m.piece_id), "same" if m.same_question else "cross", _fmt(m.cosine),
                     _fmt(m.predicted_coupling), _fmt(m.predicted_first_order)] for m in rows],
        hovertemplate=("piece %{customdata[0]} (%{customdata[1]}-question)<br>GradSim to edited %{customdata[2]}"
                       "<br>predicted (coupling) %{customdata[3]}<br>predicted (first order) %{customdata[4]}"
                       "<br>measured Δlog P %{y:.4f} nats<extra>" + name + "</extra>"))


def _ripple_title(which: str, rho: Optional[float]) -> str:
    return f"Ripple: {which} prediction vs measured Δlog P<br><sub>pooled Spearman's ρ = {_fmt(rho, 3)}</sub>"


def benchmark_scatter(r: LoadedRun) -> Optional[go.Figure]:
    """Benchmark mode: each counted test query's measured rise of log P (nats) against a
    predictor's score, one colour per criterion; a menu switches predictor. Only tests of
    successful edits are drawn (the ones every statistic uses); None when there are none."""
    b = r.benchmark
    tests = [t for t in r.tests if t.edit_success]
    if b is None or not tests or not b.predictors:
        return None
    step = max(1, -(-len(tests) // MAX_SCATTER_POINTS))
    tests = tests[::step]
    names = sorted(b.predictors, key=lambda p: p != "gradsim")  # GradSim first: the page's question is about it
    crits = sorted({t.criterion for t in tests})
    by_crit = {c: [t for t in tests if t.criterion == c] for c in crits}

    def xs(p: str) -> list[list[Optional[float]]]:
        return [[t.predictors.get(p) for t in by_crit[c]] for c in crits]

    def title(p: str) -> str:
        sp = b.predictors[p].pooled.spearman
        ci = f" [{_fmt(sp.ci_low, 3)}, {_fmt(sp.ci_high, 3)}]" if sp.ci_low is not None else ""
        sub = f" (every {step}th test drawn)" if step > 1 else ""
        return (f"Ripple ({b.method}): {p} vs measured rise<br><sub>pooled Spearman's ρ = {_fmt(sp.value, 3)}{ci}"
                f"{sub}</sub>")

    fig = go.Figure([_criterion_trace(k, c, by_crit[c], names[0]) for k, c in enumerate(crits)])
    fig.update_layout(
        template="plotly_white", height=540, title={"text": title(names[0])},
        xaxis={"title": {"text": f"{names[0]} score"}, "zeroline": True}, margin={"t": 100},
        yaxis={"title": {"text": "measured rise of log P(expected answer) (nats)"}, "zeroline": True},
        updatemenus=[{"type": "dropdown", "x": 1.0, "xanchor": "right", "y": 1.02, "yanchor": "bottom", "buttons": [
            {"label": p, "method": "update", "args": [{"x": xs(p)}, {"title.text": title(p), "xaxis.title.text": f"{p} score"}]}
            for p in names]}])
    return fig


def _criterion_trace(k: int, criterion: str, rows: list[TestMeasurement], predictor: str) -> go.Scatter:
    name = plotly_text(criterion)
    return go.Scatter(
        x=[t.predictors.get(predictor) for t in rows], y=[t.rise for t in rows], mode="markers", name=name,
        marker={"color": COLORS[k % len(COLORS)], "size": 6, "opacity": 0.75},
        customdata=[[plotly_text(t.edit_id), plotly_text(t.test_id), _fmt(t.logprob_before), _fmt(t.logprob_after)]
                    for t in rows],
        hovertemplate=("edit %{customdata[0]}<br>test %{customdata[1]}<br>log P before %{customdata[2]} → after "
                       "%{customdata[3]} nats<br>score %{x:.4g}<br>rise %{y:.4f} nats<extra>" + name + "</extra>"))


def sweep_figure(r: LoadedRun) -> Optional[go.Figure]:
    """The latest ``--sweep``: each predictor's pooled Spearman's rho with the measured rise (clustered
    bootstrap interval as error bars) against the swept knob's value, one line per predictor, the
    knob on a log axis when its values span a factor of 10 or more; the hover gives each point's
    successful edits. None without a sweep."""
    if not r.sweeps:
        return None
    name, sw = r.sweeps[-1]
    xs = [p.strength for p in sw.points]
    names = sorted({n for p in sw.points for n in p.spearman}, key=lambda p: (p != "gradsim", p != "first_order", p))
    traces = []
    for k, n in enumerate(names):
        cs = [p.spearman.get(n) for p in sw.points]
        y = [c.value if c else None for c in cs]
        up = [(c.ci_high - c.value) if c and c.value is not None and c.ci_high is not None else None for c in cs]
        down = [(c.value - c.ci_low) if c and c.value is not None and c.ci_low is not None else None for c in cs]
        traces.append(go.Scatter(
            x=xs, y=y, mode="lines+markers", name=plotly_text(n), visible=True if n in ("gradsim", "first_order") else "legendonly",
            line={"color": COLORS[k % len(COLORS)]},
            error_y={"type": "data", "array": up, "arrayminus": down, "visible": True, "thickness": 1},
            customdata=[[p.n_successful, p.n_edits] for p in sw.points],
            hovertemplate=(f"{plotly_text(sw.knob)} = %{{x:.4g}}<br>Spearman's ρ %{{y:.3f}}<br>%{{customdata[0]}} of "
                           f"%{{customdata[1]}} edits succeeded<extra>{plotly_text(n)}</extra>")))
    positive = [x for x in xs if x > 0]
    log = bool(positive) and max(positive) / min(positive) >= 10
    fig = go.Figure(traces)
    fig.update_layout(
        template="plotly_white", height=460, margin={"t": 90},
        title={"text": f"Sweep of {plotly_text(sw.method)}'s {plotly_text(sw.knob)} ({plotly_text(name)}): "
                       "pooled Spearman's ρ with the measured rise<br><sub>click a legend entry to show a predictor; "
                       "bars: 95% clustered bootstrap interval</sub>"},
        xaxis={"title": {"text": plotly_text(sw.knob)}, "type": "log" if log else "linear"},
        yaxis={"title": {"text": "Spearman's ρ (pooled)"}, "range": [-1, 1], "zeroline": True})
    return fig
