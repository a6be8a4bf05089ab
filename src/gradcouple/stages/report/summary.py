"""The nine sections of ``summary.json`` from a loaded run, and the file that lists itself."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from datetime import datetime, timezone
from typing import Any, Optional

import torch
from pydantic import BaseModel

from ..._version import __version__
from ...artifacts import RippleSummary
from ...metrics import Interval, describe
from ...pairs import upper_pairs
from .load import LoadedRun

TOP_PAIRS = 10
TOP_QUESTIONS = 10
BASELINES = ("norm", "shuffled")  # benchmark predictors the headline answer quotes beside GradSim
RIPPLE_FIELDS = ("method", "hparams", "n_edits", "n_successful", "seconds", "spearman_coupling",
                 "spearman_first_order", "spearman_coupling_successful", "precision_at_k", "per_edit", "pooled",
                 "baseline_logprob_max_abs_diff_vs_manifest")


class Headline(BaseModel):
    """The few numbers a caller prints: GradSim means over off-diagonal pairs, ripple rank correlations."""

    n_pieces: int
    mode: str = "full"
    mean_gradsim: Optional[float]
    same_question_mean: Optional[float]
    cross_question_mean: Optional[float]
    ripple_done: bool
    ripple_spearman_coupling: Optional[Interval]
    ripple_spearman_first_order: Optional[Interval]
    gpu: Optional[str]


def _as_interval(r: LoadedRun, predictor: str) -> Optional[Interval]:
    """A benchmark predictor's pooled Spearman's rho as an Interval (None without a benchmark run)."""
    if r.benchmark is None:
        return None
    c = r.benchmark.predictors[predictor].pooled.spearman
    return Interval(estimate=c.value, low=c.ci_low, high=c.ci_high, n=c.n_points)


def headline(r: LoadedRun) -> Headline:
    """The :class:`Headline` of a loaded run (ripple figures None when ripple was not run)."""
    p, t = r.stats.pairs, r.manifest.timing
    return Headline(n_pieces=len(r.records), mode=r.stats.mode, mean_gradsim=p.all.mean, same_question_mean=p.same_question.mean,
                    cross_question_mean=p.cross_question.mean, ripple_done=r.ripple is not None or r.benchmark is not None,
                    ripple_spearman_coupling=r.ripple.spearman_coupling if r.ripple else _as_interval(r, "gradsim"),
                    ripple_spearman_first_order=r.ripple.spearman_first_order if r.ripple else _as_interval(r, "first_order"),
                    gpu=t.device.gpu if t else None)


def verdict(est: Optional[Interval], baselines: list[Interval] = ()) -> str:
    """'yes' (interval above 0), 'not beyond a baseline' (above 0, but a baseline predictor's
    estimate is as high), 'reversed' (below 0), 'not detectably' (the interval holds 0) or
    'undetermined' (no interval)."""
    if est is None or est.estimate is None or est.low is None or est.high is None:
        return "undetermined"
    if est.high < 0:
        return "reversed"
    if est.low <= 0:
        return "not detectably"
    if any(b.estimate is not None and b.estimate >= est.estimate for b in baselines):
        return "not beyond a baseline"
    return "yes"


def ripple_answer(r: LoadedRun) -> Optional[dict]:
    """The one-line answer to "does coupling predict ripple here?" (None when ripple was not run).

    Pieces mode reads the mean over edits of Spearman's rho between the coupling prediction and
    the measured ripple, with its bootstrap interval (``ripple/summary.json`` spearman_coupling);
    benchmark mode reads GradSim's pooled Spearman's rho with the measured rise, with its
    clustered bootstrap interval. ``answer`` is :func:`verdict` of it and the baselines. The first-order
    prediction's figure is given beside it for comparison, and in benchmark mode the baseline
    predictors' (:data:`BASELINES`): a GradSim figure no better than theirs says little.
    """
    if r.ripple is None and r.benchmark is None:
        return None
    h = headline(r)
    est, fo = h.ripple_spearman_coupling, h.ripple_spearman_first_order
    if r.ripple is not None:
        what = (f"mean over {r.ripple.n_edits} edits ({r.ripple.method}) of Spearman's rho between the coupling "
                "prediction and the measured ripple")
        interval, unit = "bootstrap interval", "edits"
    else:
        b = r.benchmark
        what = (f"pooled Spearman's rho between GradSim and the measured rise over {b.n_tests_counted} test queries "
                f"of {b.n_successful} successful {b.method} edits")
        interval, unit = "clustered bootstrap interval", "points"
    base = {name: _as_interval(r, name) for name in BASELINES if name in r.benchmark.predictors} if r.benchmark else {}
    baselines = {name: b.model_dump() for name, b in base.items()}
    return {"answer": verdict(est, list(base.values())), "what": what, "interval": interval, "unit": unit,
            "estimate": est.model_dump() if est else None, "first_order": fo.model_dump() if fo else None,
            "baselines": baselines}


def _headline_of(s) -> tuple[Optional[Interval], Optional[Interval]]:
    """(coupling, first order) Spearman's rho of one ripple summary, as the headline reads them."""
    if s.mode == "pieces":
        return s.spearman_coupling, s.spearman_first_order
    def iv(name):
        c = s.predictors[name].pooled.spearman if name in s.predictors else None
        return Interval(estimate=c.value, low=c.ci_low, high=c.ci_high, n=c.n_points) if c else None
    return iv("gradsim"), iv("first_order")


def ripple_results(r: LoadedRun) -> list[dict]:
    """Every current ripple result set side by side (oldest first): method, knobs, mode, edits made and
    successful, and the headline's Spearman's rho of coupling and of first order with their intervals."""
    out = []
    for name, s in r.ripple_sets:
        coupling, first = _headline_of(s)
        out.append({"name": name, "method": s.method, "hparams": s.hparams, "mode": s.mode, "n_edits": s.n_edits,
                    "n_successful": s.n_successful, "spearman_coupling": coupling.model_dump() if coupling else None,
                    "spearman_first_order": first.model_dump() if first else None})
    return out


def stale_ripple_advice(r: LoadedRun) -> Optional[str]:
    """What to run to redo the ripple result sets made from another coupling (None when there are none)."""
    if not r.stale_ripple:
        return None
    root = r.run.root
    if not r.full:  # ripple needs the full matrix: rerunning ripple on a top-k coupling would be refused
        return (f"ripple reads the full GradSim matrix: rerun `gradcouple couple --run {root}` without --top-k, "
                f"then `gradcouple ripple --run {root}` with each method")
    return f"rerun `gradcouple ripple --run {root}` with each method to redo them"


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, so it is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def summarize(r: LoadedRun) -> dict:
    """The nine sections (:data:`gradcouple.report.SECTIONS`); log-probs in nats, sizes in bytes, times in seconds.

    ``generated_files`` lists the run's files except the report's own two outputs.
    """
    report_files = r.run.report.own_files()
    return json_safe({
        "metadata": metadata(r), "knowledge_pieces": knowledge_pieces(r), "gradient_analysis": gradient_analysis(r),
        "coupling_analysis": coupling_analysis(r), "high_coupling_pairs": [p.model_dump() for p in r.pairs[:TOP_PAIRS]],
        "cross_pot_analysis": cross_pot_analysis(r),
        "generated_files": generated_files([f for f in r.files if f[0] not in report_files]),
        "gpu_performance": gpu_performance(r), "experiment_readiness": experiment_readiness(r)})


def metadata(r: LoadedRun) -> dict:
    """Model, target layers, inputs' fingerprints, versions, the extraction's and the saved settings."""
    m = r.manifest
    return {"model": m.model.model_dump(mode="json"), "targets": [t.model_dump() for t in m.targets],
            "n_targets": len(m.targets), "n_params": m.n_params, "datasets": sorted({p.dataset for p in r.pieces}),
            "n_pieces": len(r.records), "package_version": __version__, "extract_package_version": m.package_version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "inputs": m.inputs.values,
            "prompt_template": m.config.get("data", {}).get("prompt_template"), "compute_dtype": m.compute_dtype,
            "layers": m.config.get("model", {}).get("layers"), "run_dir": str(r.run.root),
            "config": r.config.model_dump(mode="json") if r.config else None}


def knowledge_pieces(r: LoadedRun) -> dict:
    """Counts per kind and dataset, questions, counterfactuals, mean token counts."""
    recs = r.records
    return {"count": len(recs), "per_kind": dict(sorted(Counter(x.kind for x in recs).items())),
            "per_dataset": dict(sorted(Counter(p.dataset for p in r.pieces).items())),
            "n_questions": len(set().union(*r.owners)) if recs else 0,
            "with_counterfactual": sum(p.counterfactual is not None for p in r.pieces),
            "mean_prompt_tokens": describe([x.n_prompt_tokens for x in recs]).mean,
            "mean_answer_tokens": describe([x.n_answer_tokens for x in recs]).mean,
            "mean_inputs": describe([x.n_inputs for x in recs]).mean}


def gradient_analysis(r: LoadedRun) -> dict:
    """Store, shard sizes against a dense fp16 gradient, log-probs (nats) and gradient norms."""
    m, recs = r.manifest, r.records
    shard_bytes = sum(s.bytes for s in m.shards)
    per_piece = shard_bytes / len(recs) if recs else None
    listed = {path for path, _ in r.files}
    return {"store": m.store.kind, "store_settings": m.store.model_dump(), "dtype": m.dtype, "n_params": m.n_params,
            "n_shards": len(m.shards), "shard_bytes": shard_bytes, "bytes_per_piece": per_piece,
            "dense_fp16_bytes_per_piece": 2 * m.n_params,
            "compression_vs_dense": 2 * m.n_params / per_piece if per_piece else None,
            "logprob_nats": describe([x.logprob for x in recs]).model_dump(),
            "logprob_per_answer_token_nats": describe([x.logprob / x.n_answer_tokens for x in recs
                                                       if x.n_answer_tokens]).model_dump(),
            "grad_norm": describe([x.norm for x in recs]).model_dump(),
            "grad_norm_mean_per_target": {n: describe([x.sq_norm[n] ** 0.5 for x in recs if n in x.sq_norm]).mean
                                          for n in m.names},
            "shards_present": all(r.run.relative(r.run.gradients.shard_file(s)) in listed for s in m.shards)}


def coupling_analysis(r: LoadedRun) -> dict:
    """stats.json as written by couple, plus the matrix file (relative to the run)."""
    matrix = r.run.coupling.cosine_path if r.full else r.run.coupling.topk_path
    return {**r.stats.model_dump(mode="json"), "matrix": r.run.relative(matrix)}


def cross_pot_analysis(r: LoadedRun) -> dict:
    """Same- vs cross-question GradSim from stats.json, and the most coupled questions."""
    p = r.stats.pairs
    same, cross = p.same_question.mean, p.cross_question.mean
    diff = same - cross if same is not None and cross is not None else None
    questions = question_coupling(r)
    split = p.model_dump(exclude={"all"})
    return {**split, "difference": diff, "ratio": same / cross if diff is not None and cross else None,
            "source": r.run.relative(r.run.coupling.stats_path), "note": r.stats.note,
            "n_questions_with_pairs": len(questions), "top_questions": questions[:TOP_QUESTIONS]}


def question_coupling(r: LoadedRun) -> list[dict]:
    """Per question with a known pair among its own pieces (by owners): GradSim ``describe``, most coupled first."""
    members: dict[str, list[int]] = defaultdict(list)
    for k, own in enumerate(r.owners):
        for q in own:
            members[q].append(k)
    rows = []
    for q, vals in _question_values(r, members).items():
        d = describe(vals)
        if d.n:
            text = next((r.pieces[k].prompt for k in members[q] if r.records[k].kind == "multi_hop"), None)
            rows.append({"question_id": q, "question": text, "n_pieces": len(members[q]), "gradsim": d.model_dump()})
    return sorted(rows, key=lambda x: (-x["gradsim"]["mean"], x["question_id"]))


def _question_values(r: LoadedRun, members: dict[str, list[int]]) -> dict[str, Any]:
    if r.full:
        out = {}
        for q, idx in members.items():
            t = torch.tensor(idx)
            out[q] = upper_pairs(r.cosine[t][:, t])[2]
        return out
    own, out = [set(o) for o in r.owners], defaultdict(list)
    for a, b, v in zip(*(x.tolist() for x in r.known_pairs())):
        for q in own[a] & own[b]:
            out[q].append(v)
    return out


def generated_files(files: list[tuple[str, int]]) -> dict:
    """(relative path, bytes) pairs as the generated_files section."""
    entries = [{"path": p, "bytes": b} for p, b in files]
    return {"root": ".", "n_files": len(entries), "total_bytes": sum(f["bytes"] for f in entries), "files": entries}


def gpu_performance(r: LoadedRun) -> dict:
    """Devices, wall times (seconds), throughput (pieces/s) and peak memory (bytes) of every stage."""
    t, rip = r.manifest.timing, r.ripple or r.benchmark
    dev = t.device.model_dump() if t else {}
    return {"device": dev.get("device"), "gpu": dev.get("gpu"),
            "note": f"GPU: {dev['gpu']}" if dev.get("gpu") else "no GPU: ran on CPU",
            "cpu": dev.get("cpu"), "threads": dev.get("threads"), "torch": dev.get("torch"),
            "peak_gpu_memory_bytes": dev.get("peak_gpu_memory_bytes"),
            "pieces_per_s": t.pieces_per_s if t else None, "load_seconds": t.load_seconds if t else None,
            "extract_seconds": t.extract_seconds if t else None, "total_extract_seconds": t.seconds if t else None,
            "peak_rss_bytes": t.peak_rss_bytes if t else None,
            "couple_seconds": r.stats.seconds, "couple_peak_rss_bytes": r.stats.peak_rss_bytes,
            "ripple_device": rip.device.model_dump() if rip else None, "ripple_seconds": rip.seconds if rip else None}


def experiment_readiness(r: LoadedRun) -> dict:
    """Which stages are done, the ripple figures (intervals as dicts) and the next command to run."""
    listed = {path for path, _ in r.files}
    shards = all(r.run.relative(r.run.gradients.shard_file(s)) in listed for s in r.manifest.shards)
    done = r.ripple is not None or r.benchmark is not None
    return {"gradients_complete": r.manifest.complete and shards, "coupling_done": True,
            "coupling_mode": r.stats.mode, "ripple_done": done,
            "ripple_mode": "benchmark" if r.benchmark else "pieces" if r.ripple else None,
            "report_written": r.run.relative(r.run.report.index_path) in listed, **ripple_figures(r.ripple),
            **benchmark_figures(r.benchmark), "coupling_predicts_ripple": ripple_answer(r),
            "ripple_results": ripple_results(r),
            "stale_ripple_results": [{"name": n, "changed": c} for n, c in r.stale_ripple],
            "next_step": stale_ripple_advice(r) if r.stale_ripple and not done else
            (None if done else f"gradcouple ripple --run {r.run.root}")}


def benchmark_figures(b) -> dict:
    """The benchmark mode's headline figures: success, exact match, and every predictor's pooled
    Spearman and Pearson with their intervals and AUROC (all None without a benchmark run)."""
    if b is None:
        return {"benchmark": None}
    return {"benchmark": {
        "method": b.method, "n_edits": b.n_edits, "n_successful": b.n_successful, "n_tests_counted": b.n_tests_counted,
        "success_rate": b.n_successful / b.n_edits if b.n_edits else None,
        "exact_match": {k: v.model_dump() for k, v in b.exact_match.items()}, "multi_hop_accuracy": b.multi_hop_accuracy,
        "predictors": {n: {"spearman": p.pooled.spearman.model_dump(), "pearson": p.pooled.pearson.model_dump(),
                           "auroc": p.pooled.auroc} for n, p in b.predictors.items()}}}


def ripple_figures(rip: Optional[RippleSummary]) -> dict:
    """``ripple_<field>`` for the summary fields of ripple/summary.json (all None without ripple)."""
    d = rip.model_dump(mode="json", include=set(RIPPLE_FIELDS)) if rip else {}
    out = {f"ripple_{k}": d.get(k) for k in RIPPLE_FIELDS}
    out["ripple_success_rate"] = rip.n_successful / rip.n_edits if rip and rip.n_edits else None
    return out
