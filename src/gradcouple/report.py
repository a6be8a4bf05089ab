"""The ``report`` stage: one self-contained HTML page and ``summary.json`` from a run directory.

Reads only files (``gradients/manifest.json``, ``coupling/*``, optionally ``ripple/*``,
``pieces.jsonl``, ``config.json``) and writes ``RUN/report/index.html`` (plotly figures with the
plotly JavaScript embedded, so the page opens offline) and ``RUN/report/summary.json`` (the nine
sections of the seed prototype, see :data:`SECTIONS`).
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import __version__
from .config import RunConfig
from .errors import ArtifactError, DataError
from .io import atomic_open
from .runinfo import human_bytes

SECTIONS = ("metadata", "knowledge_pieces", "gradient_analysis", "coupling_analysis", "high_coupling_pairs",
            "cross_pot_analysis", "generated_files", "gpu_performance", "experiment_readiness")
TOP_PAIRS_SUMMARY = 10
TOP_PAIRS_HTML = 25
TOP_QUESTIONS = 10
HIST_BINS = 100


@dataclass
class ReportResult:
    """Where the outputs are, and the summary that was written."""

    out_dir: Path
    index_html: Path
    summary_json: Path
    summary: dict
    seconds: float


@dataclass
class _Run:
    """Everything the report reads from a run directory, loaded once."""

    dir: Path
    manifest: dict
    pieces: dict[str, dict]  # pieces.jsonl records by id ({} when the file is absent)
    config: Optional[dict]
    stats: dict
    pairs: list[dict]
    mode: str  # "full" or "topk"
    ids: list[str]
    cosine: torch.Tensor  # (N, N) float64 in full mode, (N, k) in top-k mode
    indices: Optional[torch.Tensor]  # (N, k) int64 in top-k mode
    ripple: Optional[dict]
    ripple_rows: list[dict]
    pairs_different_answer: list[dict] = field(default_factory=list)
    _views: Optional[dict] = field(default=None, repr=False)

    @property
    def metas(self) -> list[dict]:
        return self.manifest["pieces"]

    def owners(self) -> list[set[str]]:
        """Multi-hop question ids each piece belongs to (as the couple stage defines same-question)."""
        out = []
        for m in self.metas:
            rec = self.pieces.get(m["id"], {})
            own = rec.get("owners") or [rec.get("question_id") or m.get("question_id") or m["id"]]
            out.append(set(own))
        return out


# ---------------------------------------------------------------- loading


def _rel(run_dir: Path, p: Path) -> str:
    return p.relative_to(run_dir).as_posix()


def _read_json(path: Path, fix: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None


def _load(run_dir: str | Path) -> _Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: no such run directory; make one with `gradcouple extract --out {run_dir}`.")
    mpath = run_dir / "gradients" / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: no gradient manifest; run `gradcouple extract --out {run_dir}` first.")
    manifest = _read_json(mpath, f"rerun `gradcouple extract --out {run_dir} --overwrite`.")
    if not manifest.get("complete"):
        raise ArtifactError(f"{mpath}: extraction is incomplete; rerun the same `gradcouple extract` command to resume it.")

    redo = f"run `gradcouple couple --run {run_dir}` first."
    cdir = run_dir / "coupling"
    spath = cdir / "stats.json"
    if not spath.is_file():
        raise ArtifactError(f"{spath}: no coupling statistics; {redo}")
    stats = _read_json(spath, f"rerun `gradcouple couple --run {run_dir}`.")
    if cdir.joinpath("cosine.pt").is_file():
        d = torch.load(cdir / "cosine.pt", weights_only=True, map_location="cpu")
        mode, cosine, indices = "full", d["cosine"].double(), None
    elif cdir.joinpath("topk.pt").is_file():
        d = torch.load(cdir / "topk.pt", weights_only=True, map_location="cpu")
        mode, cosine, indices = "topk", d["cosine"].double(), d["indices"].long()
    else:
        raise ArtifactError(f"{cdir / 'cosine.pt'}: no coupling matrix (nor topk.pt); {redo}")
    ppath = cdir / "pairs.csv"
    if not ppath.is_file():
        raise ArtifactError(f"{ppath}: no list of coupled pairs; {redo}")
    ids = list(d["ids"])
    man_ids = [m["id"] for m in manifest["pieces"]]
    stale = f"rerun `gradcouple couple --run {run_dir}`."
    if ids != man_ids:
        raise ArtifactError(f"{cdir}: the coupling's piece ids differ from {mpath} (stale coupling); {stale}")
    if stats.get("config_hash") and manifest.get("config_hash") and stats["config_hash"] != manifest["config_hash"]:
        raise ArtifactError(f"{spath}: computed from an extraction with config hash {stats['config_hash']}, but "
                            f"{mpath} has {manifest['config_hash']} (stale coupling); {stale}")

    def read_pairs(path: Path) -> list[dict]:
        rows = []
        with open(path, encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                row["rank"] = int(row["rank"])
                row["cosine"] = float(row["cosine"])
                row["same_question"] = row.get("same_question") == "True"
                rows.append(row)
        return rows

    pairs = read_pairs(ppath)
    pairs_diff = read_pairs(cdir / "pairs_different_answer.csv") if (cdir / "pairs_different_answer.csv").is_file() else []

    pieces: dict[str, dict] = {}
    pj = run_dir / "pieces.jsonl"
    if pj.is_file():
        for n, line in enumerate(pj.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                    pieces[obj["id"]] = obj
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{pj}:{n}: not a knowledge piece (JSON with an 'id'); "
                                    f"rerun `gradcouple extract --out {run_dir}`.") from None
    cj = run_dir / "config.json"
    config = _read_json(cj, "delete it or rerun `gradcouple extract`.") if cj.is_file() else None

    ripple, rows = None, []
    rsum = run_dir / "ripple" / "summary.json"
    if rsum.is_file():
        ripple = _read_json(rsum, f"rerun `gradcouple ripple --run {run_dir}`.")
        rj = run_dir / "ripple" / "edits.jsonl"
        if rj.is_file():
            for n, line in enumerate(rj.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ArtifactError(f"{rj}:{n}: not valid JSON ({e.msg}); rerun `gradcouple ripple --run {run_dir}`.") from None
    return _Run(run_dir, manifest, pieces, config, stats, pairs, mode, ids, cosine, indices, ripple, rows, pairs_diff)


# ---------------------------------------------------------------- derived numbers


def _finite(x: Any) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _clean(obj: Any) -> Any:
    """Non-finite floats -> None, so summary.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _describe(values: list[float]) -> dict:
    v = [x for x in (_finite(y) for y in values) if x is not None]
    if not v:
        return {"count": 0, "mean": None, "min": None, "max": None, "median": None}
    a = np.asarray(v, dtype=np.float64)
    return {"count": int(a.size), "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
            "median": float(np.median(a))}


def _known_pairs(run: _Run) -> dict[tuple[int, int], float]:
    """Top-k mode: {(i, j) with i < j: cosine} for every neighbour pair that was kept."""
    seen: dict[tuple[int, int], float] = {}
    for i, (js, cs) in enumerate(zip(run.indices.tolist(), run.cosine.tolist())):
        for j, c in zip(js, cs):
            if j != i:
                seen.setdefault((min(i, j), max(i, j)), c)
    return seen


def _upper_pairs(run: _Run):
    """Yield (values, same_mask) blocks of every known off-diagonal unordered pair, each once."""
    owners = run.owners()
    qids = sorted(set().union(*owners)) if owners else []
    col = {q: k for k, q in enumerate(qids)}
    M = torch.zeros(len(owners), max(1, len(qids)))
    for i, own in enumerate(owners):
        for q in own:
            M[i, col[q]] = 1.0
    n = len(owners)
    if run.mode == "full":
        for s in range(0, n, 1024):
            e = min(n, s + 1024)
            rows = torch.arange(s, e)[:, None]
            keep = torch.arange(n)[None, :] > rows
            same = (M[s:e] @ M.t()) > 0
            yield run.cosine[s:e][keep], same[keep]
    else:
        seen = _known_pairs(run)
        if seen:
            keys = list(seen)
            v = torch.tensor([seen[k] for k in keys], dtype=torch.float64)
            same = torch.tensor([bool(owners[a] & owners[b]) for a, b in keys])
            yield v, same


def _views(run: _Run) -> dict:
    """Histograms of off-diagonal cosines (same vs cross question) and per-question coupling."""
    if run._views is not None:
        return run._views
    edges = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    h_same = np.zeros(HIST_BINS, dtype=np.int64)
    h_cross = np.zeros(HIST_BINS, dtype=np.int64)
    n_same = n_cross = 0
    sum_same = sum_cross = 0.0
    for v, same in _upper_pairs(run):
        a = v.clamp(-1.0, 1.0).numpy()
        s = same.numpy()
        h_same += np.histogram(a[s], bins=edges)[0]
        h_cross += np.histogram(a[~s], bins=edges)[0]
        n_same += int(s.sum())
        n_cross += int((~s).sum())
        sum_same += float(a[s].sum())
        sum_cross += float(a[~s].sum())

    owners = run.owners()
    members: dict[str, list[int]] = {}
    for i, own in enumerate(owners):
        for q in own:
            members.setdefault(q, []).append(i)
    per_q = []
    if run.mode == "full":
        for q, idx in members.items():
            if len(idx) < 2:
                continue
            t = torch.tensor(idx)
            sub = run.cosine[t][:, t]
            iu = torch.triu_indices(len(idx), len(idx), offset=1)
            vals = sub[iu[0], iu[1]]
            per_q.append({"question_id": q, "n_pieces": len(idx), "pairs": int(vals.numel()),
                          "mean": float(vals.mean()), "min": float(vals.min()), "max": float(vals.max())})
    else:
        known = _known_pairs(run)
        for q, idx in members.items():
            if len(idx) < 2:
                continue
            vals = [known[(a, b)] for k, a in enumerate(idx) for b in idx[k + 1:] if (a, b) in known]
            if vals:
                per_q.append({"question_id": q, "n_pieces": len(idx), "pairs": len(vals),
                              "mean": float(np.mean(vals)), "min": float(min(vals)), "max": float(max(vals))})
    per_q.sort(key=lambda r: (-r["mean"], r["question_id"]))
    for r in per_q:
        mh = next((run.metas[i] for i in members[r["question_id"]] if run.metas[i].get("kind") == "multi_hop"), None)
        r["question"] = ((run.pieces.get(mh["id"]) or {}).get("prompt") or mh.get("prompt")) if mh else None
    run._views = {"edges": edges, "same": h_same, "cross": h_cross, "n_same": n_same, "n_cross": n_cross,
                  "mean_same": sum_same / n_same if n_same else None,
                  "mean_cross": sum_cross / n_cross if n_cross else None, "per_question": per_q}
    return run._views


def _files(run_dir: Path) -> list[dict]:
    out = []
    for p in sorted(run_dir.rglob("*")):
        rel = _rel(run_dir, p)
        # atomic_open's temp files start with "."; the report adds its own outputs itself
        if not p.is_file() or p.name.startswith(".") or rel.startswith("report/"):
            continue
        out.append({"path": rel, "bytes": p.stat().st_size})
    return out


def _files_section(files: list[dict]) -> dict:
    return {"root": ".", "n_files": len(files), "total_bytes": sum(f["bytes"] or 0 for f in files), "files": files}


def _dataset_of(run: _Run, meta: dict) -> str:
    rec = run.pieces.get(meta["id"])
    if rec and rec.get("dataset"):
        return rec["dataset"]
    return meta["id"].split(":", 1)[0] if ":" in meta["id"] else "unknown"


def _summary_from(run: _Run) -> dict:
    man, metas, stats = run.manifest, run.metas, run.stats
    timing = man.get("timing") or {}
    n = len(metas)
    datasets: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for m in metas:
        ds = _dataset_of(run, m)
        datasets[ds] = datasets.get(ds, 0) + 1
        k = m.get("kind") or (run.pieces.get(m["id"]) or {}).get("kind") or "unknown"
        kinds[k] = kinds.get(k, 0) + 1
    questions = set().union(*run.owners()) if n else set()

    def mean_of(key: str) -> Optional[float]:
        v = [m[key] for m in metas if m.get(key) is not None]
        return float(np.mean(v)) if v else None

    metadata = {
        "model": man.get("model"), "targets": man.get("targets"), "n_targets": len(man.get("targets") or []),
        "n_params": man.get("n_params"), "datasets": sorted(datasets), "n_pieces": n,
        "package_version": __version__, "extract_package_version": man.get("package_version"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config_hash": man.get("config_hash"), "pieces_sha256": man.get("pieces_sha256"),
        "prompt_template": man.get("prompt_template"), "compute_dtype": man.get("compute_dtype"),
        "layers": (run.config or {}).get("model", {}).get("layers"), "run_dir": str(run.dir),
    }
    knowledge = {
        "count": n, "per_kind": kinds, "per_dataset": datasets, "n_questions": len(questions),
        "with_counterfactual": sum(1 for m in metas if (run.pieces.get(m["id"]) or {}).get("counterfactual")),
        "mean_prompt_tokens": mean_of("n_prompt_tokens"), "mean_answer_tokens": mean_of("n_answer_tokens"),
        "mean_inputs": mean_of("n_inputs"),
    }

    shards = man.get("shards") or []
    shard_bytes = sum(s.get("bytes", 0) for s in shards)
    n_params = man.get("n_params") or sum(t.get("n_params", 0) for t in man.get("targets") or [])
    names = [t["name"] for t in man.get("targets") or []]
    norms = [math.sqrt(sum(m["sq_norm"].values())) for m in metas if m.get("sq_norm")]
    per_target = {nm: _describe([math.sqrt(m["sq_norm"][nm]) for m in metas if nm in (m.get("sq_norm") or {})])["mean"]
                  for nm in names}
    lp_tok = [m["logprob"] / m["n_answer_tokens"] for m in metas
              if m.get("logprob") is not None and m.get("n_answer_tokens")]
    bpp = shard_bytes / n if n else None
    gradient = {
        "store": man.get("store"), "dtype": man.get("dtype"), "n_params": n_params,
        "n_shards": len(shards), "shard_bytes": shard_bytes, "bytes_per_piece": bpp,
        "dense_fp16_bytes_per_piece": 2 * n_params if n_params else None,
        "compression_vs_dense": (2 * n_params / bpp) if n_params and bpp else None,
        "logprob_nats": _describe([m.get("logprob") for m in metas]),
        "logprob_per_answer_token_nats": _describe(lp_tok),
        "grad_norm": _describe(norms), "grad_norm_mean_per_target": per_target,
        "shards_present": all((run.dir / "gradients" / s["file"]).is_file() for s in shards),
    }

    coupling = {**stats, "matrix": "coupling/cosine.pt" if run.mode == "full" else "coupling/topk.pt"}

    high = [{k: r.get(k) for k in ("rank", "cosine", "same_question", "id_a", "id_b", "question_a", "question_b",
                                   "prompt_a", "answer_a", "prompt_b", "answer_b")} for r in run.pairs[:TOP_PAIRS_SUMMARY]]

    v = _views(run)
    sq, cq = stats.get("same_question") or {}, stats.get("cross_question") or {}
    if sq.get("mean") is not None or cq.get("mean") is not None:
        same = {"pairs": sq.get("pairs"), "mean": sq.get("mean"), "std": sq.get("std")}
        cross = {"pairs": cq.get("pairs"), "mean": cq.get("mean"), "std": cq.get("std")}
        source = "coupling/stats.json"
    else:  # top-k mode: stats.json has no split; use the neighbour pairs that are known
        same = {"pairs": v["n_same"], "mean": v["mean_same"], "std": None}
        cross = {"pairs": v["n_cross"], "mean": v["mean_cross"], "std": None}
        source = "nearest-neighbour pairs of coupling/topk.pt only"
    diff = same["mean"] - cross["mean"] if same["mean"] is not None and cross["mean"] is not None else None
    cross_pot = {
        "same_question": same, "cross_question": cross, "difference": diff,
        "ratio": same["mean"] / cross["mean"] if diff is not None and cross["mean"] else None,
        "same_answer": stats.get("same_answer"), "different_answer": stats.get("different_answer"),
        "same_question_different_answer": stats.get("same_question_different_answer"),
        "cross_question_different_answer": stats.get("cross_question_different_answer"),
        "source": source, "n_questions_with_pairs": len(v["per_question"]),
        "top_questions": v["per_question"][:TOP_QUESTIONS],
    }

    files = _files_section(_files(run.dir))

    gpu = timing.get("gpu")
    perf = {
        "device": timing.get("device"), "gpu": gpu,
        "note": f"GPU: {gpu}" if gpu else "no GPU: ran on CPU",
        "cpu": timing.get("cpu"), "threads": timing.get("threads"), "torch": timing.get("torch"),
        "pieces_per_s": timing.get("pieces_per_s"),
        "extract_seconds": timing.get("extract_seconds", timing.get("seconds")),
        "total_extract_seconds": timing.get("seconds"),
        "peak_rss_bytes": timing.get("peak_rss_bytes"), "peak_gpu_memory_bytes": timing.get("peak_gpu_memory_bytes"),
        "couple_seconds": stats.get("seconds"), "couple_peak_rss_bytes": stats.get("peak_rss_bytes"),
        "ripple_device": (run.ripple or {}).get("device"), "ripple_seconds": (run.ripple or {}).get("seconds"),
    }

    rip = run.ripple or {}
    pooled = rip.get("pooled") or {}
    edits = rip.get("edits") or []
    succ = [e.get("success") for e in edits if e.get("success") is not None]
    ready = {
        "gradients_complete": bool(man.get("complete")) and gradient["shards_present"],
        "coupling_done": True, "coupling_mode": stats.get("mode", run.mode),
        "ripple_done": run.ripple is not None,
        "report_written": (run.dir / "report" / "index.html").is_file(),
        "ripple_method": rip.get("method"), "ripple_n_edits": rip.get("n_edits", len(edits) if run.ripple else None),
        "ripple_success_rate": (sum(map(bool, succ)) / len(succ)) if succ else None,
        "ripple_spearman_coupling_mean": rip.get("spearman_coupling_mean"),
        "ripple_spearman_first_order_mean": rip.get("spearman_first_order_mean"),
        "ripple_pooled_spearman_coupling": pooled.get("spearman_coupling"),
        "ripple_pooled_spearman_first_order": pooled.get("spearman_first_order"),
        "ripple_pooled_n_points": pooled.get("n_points"),
        "next_step": None if run.ripple is not None else f"gradcouple ripple --run {run.dir}",
    }
    out = {"metadata": metadata, "knowledge_pieces": knowledge, "gradient_analysis": gradient,
           "coupling_analysis": coupling, "high_coupling_pairs": high, "cross_pot_analysis": cross_pot,
           "generated_files": files, "gpu_performance": perf, "experiment_readiness": ready}
    return _clean(out)


def build_summary(run_dir: str | Path) -> dict:
    """The nine-section summary (:data:`SECTIONS`) of a run directory, from its files only.

    Log-probs are in nats, sizes in bytes, times in seconds. ``generated_files`` lists every
    file of the other stages (path relative to ``run_dir``, size in bytes); :func:`report` adds
    its own two outputs. Ripple figures are None when ``ripple/`` is absent.

    Raises:
        ArtifactError: no complete extraction, or no (or stale) coupling in ``run_dir``; the
            message names the missing file and the command that makes it.
        DataError: an unreadable line in ``run_dir/pieces.jsonl``.
    """
    return _summary_from(_load(run_dir))


# ---------------------------------------------------------------- HTML


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _device(d: Any) -> str:
    """A ``runinfo.device_info`` dict as one phrase, e.g. 'cpu (x86_64, 2 threads)' or the GPU name."""
    if not isinstance(d, dict):
        return str(d) if d is not None else "n/a"
    if d.get("gpu"):
        return f"{d['gpu']} ({d.get('device')})"
    return f"{d.get('device')} ({d.get('cpu')}, {d.get('threads')} threads, no GPU)"


def _num(x: Any, nd: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    x = float(x)
    return f"{x:.{nd}f}" if math.isfinite(x) else "—"


def _bytes(x: Any) -> str:
    return "—" if x is None else f"{human_bytes(x)} ({int(x):,} B)"


def _secs(x: Any) -> str:
    return "—" if x is None else f"{float(x):.2f} s"


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s or "")]


def _short(s: Any, n: int) -> str:
    s = " ".join(str(s or "").split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _plotly_text(s: str) -> str:
    # plotly renders hover text as pseudo-HTML and decodes entities: escape, so texts show verbatim
    return html.escape(s, quote=False)


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells must already be escaped."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _heatmap(run: _Run, max_n: int):
    import plotly.graph_objects as go

    metas = run.metas
    order = sorted(range(len(metas)), key=lambda i: (_natural(str(metas[i].get("question_id") or "")),
                                                      metas[i].get("hop") is None, metas[i].get("hop") or 0,
                                                      _natural(metas[i]["id"])))
    shown = order[:max_n]
    n = len(shown)
    if run.mode == "full":
        t = torch.tensor(shown)
        z = run.cosine[t][:, t].numpy().round(4).tolist()
    else:
        pos = {p: k for k, p in enumerate(shown)}
        z = [[None] * n for _ in range(n)]
        for a, i in enumerate(shown):
            z[a][a] = 1.0
            for j, c in zip(run.indices[i].tolist(), run.cosine[i].tolist()):
                if j in pos:
                    z[a][pos[j]] = round(c, 4)
    labels = [_plotly_text(f"{metas[i]['id']} · {_short(metas[i].get('prompt'), 90)} → {_short(metas[i].get('answer'), 40)}")
              for i in shown]
    ticks = [_plotly_text(metas[i]["id"]) for i in shown]
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=labels, colorscale="RdBu", reversescale=True, zmin=-1, zmax=1, zmid=0,
        colorbar={"title": {"text": "GradSim"}},
        hovertemplate="<b>row</b> %{y}<br><b>col</b> %{x}<br>GradSim = %{z:.4f}<extra></extra>"))
    show_ticks = n <= 60
    axis = {"type": "category", "tickmode": "array", "tickvals": labels, "ticktext": ticks,
            "showticklabels": show_ticks, "tickfont": {"size": 9}}
    # thin lines between questions, so within-question blocks stand out
    shapes = []
    qs = [metas[i].get("question_id") for i in shown]
    cuts = [k for k in range(1, n) if qs[k] != qs[k - 1]]
    if len(cuts) <= 150:
        for k in cuts:
            line = {"color": "rgba(0,0,0,0.35)", "width": 0.6}
            shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": k - 0.5, "x1": k - 0.5, "y0": 0, "y1": 1, "line": line})
            shapes.append({"type": "line", "yref": "y", "xref": "paper", "y0": k - 0.5, "y1": k - 0.5, "x0": 0, "x1": 1, "line": line})
    size = max(520, min(1000, 300 + 6 * n))
    fig.update_layout(title={"text": f"GradSim between pieces ({n} of {len(metas)} shown, ordered by question, then hop)"},
                      xaxis=axis, yaxis={**axis, "autorange": "reversed"}, width=size + 120, height=size,
                      template="plotly_white", shapes=shapes, margin={"l": 40, "r": 20, "t": 60, "b": 40})
    return fig, n


def _distribution(run: _Run):
    import plotly.graph_objects as go

    v = _views(run)
    edges = v["edges"]
    centers = (edges[:-1] + edges[1:]) / 2
    width = float(edges[1] - edges[0])
    fig = go.Figure()
    for name, counts, total, color in (("same question", v["same"], v["n_same"], "#d62728"),
                                       ("cross question", v["cross"], v["n_cross"], "#1f77b4")):
        if not total:
            continue
        dens = (counts / (total * width)).round(5)
        fig.add_trace(go.Bar(x=centers.round(4), y=dens, width=width, name=f"{name} ({total:,} pairs)", opacity=0.6,
                             marker_color=color, customdata=counts,
                             hovertemplate=f"{name}<br>GradSim ≈ %{{x:.2f}}<br>%{{customdata}} pairs<br>density %{{y:.3f}}<extra></extra>"))
    fig.update_layout(barmode="overlay", template="plotly_white", height=420,
                      title={"text": "Off-diagonal GradSim: same-question vs cross-question pairs (each pair once)"},
                      xaxis={"title": {"text": "GradSim (cosine)"}, "range": [-1, 1]},
                      yaxis={"title": {"text": "density (each group integrates to 1)"}},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def _ripple_fig(run: _Run):
    import plotly.colors
    import plotly.graph_objects as go

    rip = run.ripple or {}
    pooled = rip.get("pooled") or {}
    edits = {i: e for i, e in enumerate(rip.get("edits") or [])}
    groups: dict[int, list[dict]] = {}
    for r in run.ripple_rows:
        groups.setdefault(int(r.get("edit", 0)), []).append(r)
    palette = plotly.colors.qualitative.Dark24
    fig = go.Figure()
    xs_c, xs_f = [], []
    for k, (e, rows) in enumerate(sorted(groups.items())):
        edited = rows[0].get("edited_id") or (edits.get(e) or {}).get("piece_id") or f"edit {e}"
        xc = [r.get("predicted_coupling") for r in rows]
        xf = [r.get("predicted_first_order") for r in rows]
        xs_c.append(xc)
        xs_f.append(xf)
        custom = [[_plotly_text(str(r.get("piece_id"))), "same" if r.get("same_question") else "cross",
                   _num(r.get("cosine")), _num(r.get("predicted_coupling")), _num(r.get("predicted_first_order"))]
                  for r in rows]
        fig.add_trace(go.Scatter(
            x=xc, y=[r.get("measured") for r in rows], mode="markers", name=_plotly_text(f"edit {e}: {edited}"),
            marker={"color": palette[k % len(palette)], "size": 7, "opacity": 0.8,
                    "symbol": ["diamond" if r.get("same_question") else "circle" for r in rows]},
            customdata=custom,
            hovertemplate=("piece %{customdata[0]} (%{customdata[1]}-question)<br>GradSim to edited %{customdata[2]}"
                           "<br>predicted (coupling) %{customdata[3]}<br>predicted (first order) %{customdata[4]}"
                           "<br>measured Δlog P %{y:.4f} nats<extra>" + _plotly_text(f"edit {e}: {edited}") + "</extra>")))

    def title(which: str, rho: Any) -> str:
        return f"Ripple: {which} prediction vs measured Δlog P — pooled Spearman's ρ = {_num(rho, 3)}"

    t_c = title("coupling", pooled.get("spearman_coupling"))
    t_f = title("first-order", pooled.get("spearman_first_order"))
    fig.update_layout(
        template="plotly_white", height=520, title={"text": t_c},
        xaxis={"title": {"text": "predicted Δlog P (coupling predictor)"}, "zeroline": True},
        yaxis={"title": {"text": "measured Δlog P (nats)"}, "zeroline": True},
        updatemenus=[{"type": "dropdown", "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "top", "buttons": [
            {"label": "coupling prediction", "method": "update",
             "args": [{"x": xs_c}, {"title.text": t_c, "xaxis.title.text": "predicted Δlog P (coupling predictor)"}]},
            {"label": "first-order prediction", "method": "update",
             "args": [{"x": xs_f}, {"title.text": t_f, "xaxis.title.text": "predicted Δlog P = ⟨g_j, Δθ⟩ (nats)"}]},
        ]}])
    return fig


DEFINITIONS = [
    ("log P(answer | prompt)", "Sum over all answer tokens of the log-probability the model gives each token after the "
     "prompt and the preceding answer tokens, in nats (natural log)."),
    ("GradSim (coupling)", "The cosine of two pieces' gradients of log P(answer | prompt) with respect to the target "
     "layers' weights and biases θ: GradSim(i, j) = ⟨g_i, g_j⟩ / (|g_i| |g_j|), from −1 to 1."),
    ("same-question / cross-question", "A pair is same-question when both pieces belong to one multi-hop question "
     "(its hops and the whole question), otherwise cross-question. After deduplication a piece can belong to several "
     "questions (its owners), so two pieces listed under different question ids can still be same-question."),
    ("same-answer / different-answer", "Whether the two pieces score the same answer string (case-insensitive). "
     "Pieces with the same answer tokens get similar gradients for that reason alone, so coupling between different "
     "facts is best read on different-answer pairs."),
    ("edit and ripple", "An edit changes θ by Δθ so that the edited piece answers a counterfactual; the ripple on "
     "another piece j is its measured change of log P(answer | prompt) in nats (after minus before)."),
    ("coupling prediction", "Piece j's change predicted from GradSim alone, scaled by the edit's own size: "
     "⟨g_i, Δθ⟩ · GradSim(i, j) · |g_j| / |g_i|, i.e. the part of the edit along the edited piece's gradient g_i. "
     "Only the scalar ⟨g_i, Δθ⟩ depends on the edit; the ranking over j comes from coupling and norms."),
    ("first-order prediction", "⟨g_j, Δθ⟩: the first-order Taylor estimate of piece j's change of log P for the "
     "edit's actual weight change Δθ, in nats."),
    ("Spearman's ρ", "The Pearson correlation of the ranks of predicted and measured changes, from −1 to 1 "
     "(1: the prediction orders the ripple perfectly). Per edit, and pooled over all edits' points."),
    ("Pearson r", "The linear correlation of predicted and measured changes."),
    ("precision@k", "The overlap of the top-k pieces by |predicted| change and the top-k pieces by |measured| change, "
     "divided by k."),
]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.88em}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
thead th{background:#f3f3f3}table.kv th{background:#fafafa;font-weight:600;white-space:nowrap}
.note{color:#555;font-size:.92em}.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:.4em .8em}
dl.defs dt{font-weight:600;margin-top:.4em}dl.defs dd{margin-left:1.5em}
.pair td{max-width:22em;white-space:pre-wrap;word-break:break-word}
"""


def _html_from(run: _Run, summary: dict, cfg: RunConfig) -> str:
    import plotly.io as pio

    meta, kp, ga = summary["metadata"], summary["knowledge_pieces"], summary["gradient_analysis"]
    ca, cp, perf, ready = summary["coupling_analysis"], summary["cross_pot_analysis"], summary["gpu_performance"], summary["experiment_readiness"]
    model = meta.get("model") or {}
    first = [True]

    def fig_html(fig, div_id: str) -> str:
        inc, first[0] = first[0], False
        return pio.to_html(fig, full_html=False, include_plotlyjs=inc, div_id=div_id, config={"responsive": True})

    parts: list[str] = []
    cpu_desc = f"{_e(perf.get('cpu'))}, {_e(perf.get('threads'))} threads"
    device_line = (f"GPU: {_e(perf['gpu'])} ({_e(perf.get('device'))})" if perf.get("gpu")
                   else f"CPU only — no GPU was used ({cpu_desc})")
    parts.append(f"<h1>gradcouple report</h1><p class='note'>Model <b>{_e(model.get('name'))}</b> "
                 f"({_e(model.get('description') or model.get('architecture'))}) · run "
                 f"<code>{_e(run.dir)}</code> · created {_e(meta.get('created'))} · gradcouple {_e(meta.get('package_version'))}"
                 f"<br>Extraction device: {device_line}</p>")

    defs = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in DEFINITIONS)
    parts.append(f"<h2>Definitions</h2><dl class='defs'>{defs}</dl>")

    sq, cq = cp["same_question"], cp["cross_question"]
    head = [
        ("pieces", _num(kp["count"])), ("multi-hop questions", _num(kp["n_questions"])),
        ("datasets", _e(", ".join(meta.get("datasets") or []))),
        ("gradient dimension (|θ|)", _num(ga.get("n_params"))),
        ("coupling mode", _e(ca.get("mode"))),
        ("mean GradSim (off-diagonal)", f"{_num(ca.get('mean'))} ± {_num(ca.get('std'))}"),
        ("same-question mean GradSim", f"{_num(sq.get('mean'))} ({_num(sq.get('pairs'))} pairs)"),
        ("cross-question mean GradSim", f"{_num(cq.get('mean'))} ({_num(cq.get('pairs'))} pairs)"),
        ("same − cross", _num(cp.get("difference"))),
    ]
    sqd, cqd, sa = (cp.get(k) or {} for k in ("same_question_different_answer", "cross_question_different_answer", "same_answer"))
    if sa.get("mean") is not None:
        head += [("same-answer pairs (any question)", f"{_num(sa.get('mean'))} ({_num(sa.get('pairs'))} pairs)"),
                 ("same- vs cross-question, different answers only",
                  f"{_num(sqd.get('mean'))} ({_num(sqd.get('pairs'))} pairs) vs {_num(cqd.get('mean'))} ({_num(cqd.get('pairs'))} pairs)")]
    if ready["ripple_done"]:
        head += [("edits", _num(ready.get("ripple_n_edits"))),
                 ("mean Spearman's ρ per edit (coupling / first order)",
                  f"{_num(ready.get('ripple_spearman_coupling_mean'), 3)} / {_num(ready.get('ripple_spearman_first_order_mean'), 3)}"),
                 ("pooled Spearman's ρ (coupling / first order)",
                  f"{_num(ready.get('ripple_pooled_spearman_coupling'), 3)} / {_num(ready.get('ripple_pooled_spearman_first_order'), 3)}")]
    else:
        head.append(("ripple", "not run"))
    head.append(("device", device_line))
    parts.append("<h2>Headline</h2>" + _kv([(_e(k), v) for k, v in head]))

    max_n = cfg.report.max_heatmap
    fig, shown = _heatmap(run, max_n)
    note = ""
    if shown < len(run.metas):
        note += (f"<p class='warn'>{len(run.metas):,} pieces exceed report.max_heatmap = {max_n}: the heatmap shows the "
                 f"first {shown} pieces in question/hop order only.</p>")
    if run.mode == "topk":
        note += ("<p class='warn'>Top-k coupling: only each piece's nearest neighbours were kept, so other cells are "
                 "blank.</p>")
    parts.append("<h2>(a) Coupling heatmap</h2>" + note + "<p class='note'>Hover a cell for both pieces' ids, prompts "
                 "and answers (the exact scored strings). Lines separate questions.</p>" + fig_html(fig, "fig-heatmap"))

    dnote = ("<p class='note'>Each unordered pair once, diagonal excluded; each group normalised to unit area.</p>")
    if run.mode == "topk":
        dnote += "<p class='warn'>Top-k coupling: the histogram covers the nearest-neighbour pairs only.</p>"
    parts.append("<h2>(b) Distribution of GradSim</h2>" + dnote + fig_html(_distribution(run), "fig-distribution"))

    parts.append("<h2>(c) Ripple: predicted vs measured</h2>")
    if run.ripple is None:
        parts.append(f"<p class='warn'>Ripple was not run: no <code>ripple/summary.json</code>. Run "
                     f"<code>gradcouple ripple --run {_e(run.dir)}</code>, then this report again.</p>")
    else:
        rip = run.ripple
        parts.append(f"<p class='note'>Method {_e(rip.get('method'))}, {_e(rip.get('steps'))} steps, lr {_e(rip.get('lr'))}, "
                     f"device {_e(_device(rip.get('device')))}, {_secs(rip.get('seconds'))}. One colour per edit; diamonds are "
                     f"pieces of the edited piece's own question. Use the menu to switch to the first-order prediction.</p>")
        if run.ripple_rows:
            parts.append(fig_html(_ripple_fig(run), "fig-ripple"))
        else:
            parts.append("<p class='warn'>No <code>ripple/edits.jsonl</code>: the scatter cannot be drawn.</p>")
        rows = []
        for k, e in enumerate(rip.get("edits") or []):
            cf = f"{_e(e.get('answer'))} → <b>{_e(e.get('new_answer'))}</b> <span class='note'>({_e(e.get('counterfactual_source'))})</span>"
            rows.append([str(k), _e(e.get("piece_id")), _e(_short(e.get("prompt"), 120)), cf,
                         f"{_num(e.get('logprob_new_before'), 2)} → {_num(e.get('logprob_new_after'), 2)}",
                         f"{_num(e.get('logprob_true_before'), 2)} → {_num(e.get('logprob_true_after'), 2)}",
                         _num(e.get("success")), _num(e.get("spearman_coupling"), 3), _num(e.get("spearman_first_order"), 3),
                         _num(e.get("pearson_first_order"), 3),
                         f"{_num(e.get('precision_at_k'), 2)} (k={_e(e.get('k'))})",
                         f"{_num(e.get('mean_abs_measured_same_question'))} / {_num(e.get('mean_abs_measured_cross_question'))}",
                         _num(e.get("restored")), _secs(e.get("seconds"))])
        parts.append("<h3>Per edit</h3>" + _table(
            ["#", "edited piece", "prompt", "answer → new answer", "log P(new) before → after (nats)",
             "log P(true) before → after (nats)", "success", "Spearman's ρ coupling", "Spearman's ρ first order",
             "Pearson r first order", "precision@k", "mean |measured| same / cross question (nats)", "weights restored",
             "time"], rows))

    def pair_rows(pairs: list[dict]) -> list[list[str]]:
        return [[str(r["rank"]), _num(r["cosine"]), _num(bool(r["same_question"])),
                 f"<b>{_e(r.get('id_a'))}</b><br>{_e(r.get('prompt_a'))} → {_e(r.get('answer_a'))}",
                 f"<b>{_e(r.get('id_b'))}</b><br>{_e(r.get('prompt_b'))} → {_e(r.get('answer_b'))}"]
                for r in pairs[:TOP_PAIRS_HTML]]

    prow = pair_rows(run.pairs)
    parts.append(f"<h2>Most coupled pairs</h2><p class='note'>Top {len(prow)} of coupling/pairs.csv.</p>"
                 + _table(["rank", "GradSim", "same question", "piece A", "piece B"], prow, "pair"))
    if run.pairs_different_answer:
        drow = pair_rows(run.pairs_different_answer)
        parts.append(f"<h2>Most coupled pairs with different answers</h2><p class='note'>Top {len(drow)} of "
                     f"coupling/pairs_different_answer.csv: coupling that a shared answer string cannot explain.</p>"
                     + _table(["rank", "GradSim", "same question", "piece A", "piece B"], drow, "pair"))

    qrows = [[_e(q["question_id"]), _e(_short(q.get("question"), 120)), _num(q["n_pieces"]), _num(q["pairs"]),
              _num(q["mean"]), _num(q["min"]), _num(q["max"])] for q in cp.get("top_questions") or []]
    parts.append(f"<h2>Most coupled questions</h2><p class='note'>Mean GradSim among each question's own pieces; "
                 f"{_num(cp.get('n_questions_with_pairs'))} questions have at least two pieces.</p>"
                 + _table(["question", "text", "pieces", "pairs", "mean", "min", "max"], qrows))

    krows = [("pieces", _num(kp["count"])),
             ("per kind", _e(", ".join(f"{k}: {v}" for k, v in kp["per_kind"].items()))),
             ("per dataset", _e(", ".join(f"{k}: {v}" for k, v in kp["per_dataset"].items()))),
             ("with a counterfactual", _num(kp.get("with_counterfactual"))),
             ("mean prompt / answer tokens", f"{_num(kp.get('mean_prompt_tokens'), 1)} / {_num(kp.get('mean_answer_tokens'), 1)}"),
             ("log P(answer | prompt) mean [min, max] (nats)",
              f"{_num(ga['logprob_nats']['mean'], 2)} [{_num(ga['logprob_nats']['min'], 2)}, {_num(ga['logprob_nats']['max'], 2)}]"),
             ("gradient norm |g| mean [min, max]",
              f"{_num(ga['grad_norm']['mean'], 3)} [{_num(ga['grad_norm']['min'], 3)}, {_num(ga['grad_norm']['max'], 3)}]")]
    parts.append("<h2>Knowledge pieces and gradients</h2>" + _kv(krows))

    targets = meta.get("targets") or []
    trows = [[_e(t.get("name")), _num(t.get("d_out")), _num(t.get("d_in")), _num(bool(t.get("bias"))), _num(t.get("n_params"))]
             for t in targets]
    mrows = [("model", _e(model.get("name"))), ("description", _e(model.get("description"))), ("source", _e(model.get("source"))),
             ("revision", _e(model.get("revision") or "—")), ("file sha256", _e(model.get("file_sha256") or "—")),
             ("architecture", _e(model.get("architecture"))), ("compute dtype", _e(meta.get("compute_dtype"))),
             ("config hash", _e(meta.get("config_hash"))),
             ("store / dtype", f"{_e(ga.get('store'))} / {_e(ga.get('dtype'))}"),
             ("shards", f"{_num(ga.get('n_shards'))}, {_bytes(ga.get('shard_bytes'))}"),
             ("bytes per piece", f"{_bytes(round(ga['bytes_per_piece'])) if ga.get('bytes_per_piece') is not None else '—'}"
              f" (dense fp16 gradient: {_bytes(ga.get('dense_fp16_bytes_per_piece'))})"),
             ("extraction device", device_line), ("torch", _e(perf.get("torch"))),
             ("extraction time", _secs(perf.get("extract_seconds"))),
             ("throughput", f"{_num(perf.get('pieces_per_s'), 2)} pieces/s"),
             ("peak RSS (extract)", _bytes(perf.get("peak_rss_bytes"))),
             ("peak GPU memory", _bytes(perf.get("peak_gpu_memory_bytes")) if perf.get("peak_gpu_memory_bytes") is not None
              else "— (no GPU)" if not perf.get("gpu") else "—"),
             ("coupling time / peak RSS", f"{_secs(perf.get('couple_seconds'))} / {_bytes(perf.get('couple_peak_rss_bytes'))}")]
    if ready["ripple_done"]:
        mrows.append(("ripple device / time", f"{_e(_device(perf.get('ripple_device')))} / {_secs(perf.get('ripple_seconds'))}"))
    parts.append("<h2>Model, device and timing</h2>" + _kv(mrows) + "<h3>Target layers (θ)</h3>"
                 + _table(["module", "d_out", "d_in", "bias", "parameters"], trows))

    frows = [[f"<code>{_e(f['path'])}</code>", _bytes(f["bytes"])] for f in summary["generated_files"]["files"]]
    parts.append("<h2>Files</h2>" + _table(["path (relative to the run directory)", "size"], frows)
                 + "<p class='note'>Plus report/index.html and report/summary.json.</p>")

    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>gradcouple report: "
            f"{_e(model.get('name'))}</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def render_html(run_dir: str | Path, summary: dict, cfg: RunConfig) -> str:
    """The report page for ``run_dir`` as one self-contained HTML string (plotly.js embedded once).

    Shows (a) the GradSim heatmap of the first ``cfg.report.max_heatmap`` pieces in
    question/hop order, (b) the same- vs cross-question GradSim distribution, (c) the ripple
    scatter of predicted vs measured log-prob change (nats) when ``ripple/`` exists, and tables
    of headline numbers, top pairs, edits, model, device and timing; every metric is defined once.

    Raises:
        ArtifactError, DataError: as :func:`build_summary`.
    """
    return _html_from(_load(run_dir), summary, cfg)


def _write_summary(path: Path, summary: dict) -> None:
    """Write summary.json listing itself with its own exact size (a fixed point of the byte count)."""
    files = summary["generated_files"]["files"]
    entry = {"path": _rel(path.parents[1], path), "bytes": 0}
    files.append(entry)
    text = ""
    for _ in range(8):
        summary["generated_files"].update(n_files=len(files), total_bytes=sum(f["bytes"] for f in files))
        text = json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
        size = len(text.encode("utf-8"))
        if size == entry["bytes"]:
            break
        entry["bytes"] = size
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def report(cfg: RunConfig, run_dir: str | Path) -> ReportResult:
    """Write ``run_dir/report/index.html`` and ``run_dir/report/summary.json`` (both atomically).

    Reads only files of ``run_dir``; ripple results are optional (the page says when ripple was
    not run). ``summary.json``'s ``generated_files`` includes both report files with their
    final sizes in bytes.

    Raises:
        ArtifactError: no complete extraction, or no (or stale) coupling; the message names the
            missing file and the command that makes it.
        DataError: an unreadable line in ``run_dir/pieces.jsonl``.
    """
    t0 = time.perf_counter()
    run = _load(run_dir)
    summary = _summary_from(run)
    page = _html_from(run, summary, cfg)
    out = run.dir / "report"
    index, sjson = out / "index.html", out / "summary.json"
    with atomic_open(index, "w", encoding="utf-8") as fh:
        fh.write(page)
    summary["generated_files"]["files"].append({"path": _rel(run.dir, index), "bytes": index.stat().st_size})
    summary["experiment_readiness"]["report_written"] = True
    _write_summary(sjson, summary)
    return ReportResult(out, index, sjson, summary, time.perf_counter() - t0)
