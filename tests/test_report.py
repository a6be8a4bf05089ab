"""The report stage on a small real run directory: fp16 factor shards written from random
factors (no model), the real ``couple`` stage on them, and a clearly synthetic ``ripple/``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradcouple.cli import app
from gradcouple.config import RunConfig
from gradcouple.couple import couple
from gradcouple.errors import ArtifactError
from gradcouple.gradients import PieceFactors, factored_sq_norm
from gradcouple.pieces import KnowledgePiece, PieceKind, write_pieces
from gradcouple.report import SECTIONS, _heatmap, _load, build_summary, render_html, report
from gradcouple.store import Manifest, ShardWriter

TARGETS = [{"name": "blk.0.fc", "d_in": 6, "d_out": 4, "bias": False, "transposed": False, "n_params": 24},
           {"name": "blk.1.fc", "d_in": 5, "d_out": 4, "bias": True, "transposed": False, "n_params": 24}]
NASTY = '<b>Tom & "Jerry"</b>'  # must reach the page escaped, never as markup


def _pieces() -> list[KnowledgePiece]:
    out = []
    for q in (10, 2, 1):  # "q10" sorts after "q2" only with a natural sort
        for hop in (1, 0):
            prompt = f"Hop {hop} of {NASTY}?" if (q, hop) == (2, 0) else f"Hop {hop} of question {q}?"
            out.append(KnowledgePiece(id=f"toy:q{q}:{hop}", dataset="toy", question_id=f"q{q}", hop=hop,
                                      kind=PieceKind.single_hop, prompt=prompt, answer=f"A{q}{hop}",
                                      counterfactual="B" if hop == 0 else None))
        out.append(KnowledgePiece(id=f"toy:q{q}:q", dataset="toy", question_id=f"q{q}", kind=PieceKind.multi_hop,
                                  prompt=f"Whole question {q}?", answer=f"A{q}1"))
    out.append(KnowledgePiece(id="other:x:0", dataset="other", question_id="x", hop=0, kind=PieceKind.cloze,
                              prompt="The capital of France is", answer="Paris"))
    return out


def _factors(pieces, seed=0) -> list[PieceFactors]:
    """Random factors; pieces of one question share a direction, so same-question GradSim is high."""
    g = torch.Generator().manual_seed(seed)
    base = {}
    out = []
    for k, p in enumerate(pieces):
        T = 2 + k % 3
        x, d = {}, {}
        for t in TARGETS:
            cols = t["d_in"] + int(t["bias"])
            key = (p.question_id, t["name"])
            if key not in base:
                base[key] = (torch.randn(1, cols, generator=g), torch.randn(1, t["d_out"], generator=g))
            bx, bd = base[key]
            x[t["name"]] = bx + 0.5 * torch.randn(T, cols, generator=g)
            d[t["name"]] = bd + 0.5 * torch.randn(T, t["d_out"], generator=g)
        sq = {n: factored_sq_norm(x[n], d[n]) for n in x}
        out.append(PieceFactors(x, d, -1.5 - k, sq))
    return out


def _write_run(run: Path, cfg: RunConfig) -> None:
    pieces = _pieces()
    run.mkdir(parents=True)
    write_pieces(run / "pieces.jsonl", pieces)
    cfg.save(run / "config.json")
    gdir = run / "gradients"
    gdir.mkdir()
    factors = _factors(pieces)
    writer = ShardWriter("factors", TARGETS)
    order = sorted(range(len(pieces)), key=lambda i: (factors[i].x["blk.0.fc"].shape[0], i))
    shards = []
    for s in range(0, len(order), 4):
        for r in order[s:s + 4]:
            writer.add(r, factors[r])
        shards.append(writer.flush(gdir / f"shard-{s // 4:05d}.pt"))
    metas = []
    for i, (p, f) in enumerate(zip(pieces, factors)):
        n_in = f.x["blk.0.fc"].shape[0]
        metas.append({"index": i, "id": p.id, "question_id": p.question_id, "kind": p.kind.value, "hop": p.hop,
                      "prompt": f"Question: {p.prompt}\nAnswer:", "answer": " " + p.answer, "n_prompt_tokens": n_in,
                      "n_answer_tokens": 1 + i % 2, "n_inputs": n_in, "logprob": f.logprob, "sq_norm": f.sq_norm,
                      "shard": 0})
    Manifest({"format": "gradcouple-gradients", "version": 1, "package_version": "0.1.0", "config_hash": "feedc0de",
              "model": {"name": "toy-random", "source": "synthetic", "revision": None, "file_sha256": None,
                        "architecture": "toy"},
              "targets": TARGETS, "n_params": 48, "store": "factors", "dtype": "float16", "compute_dtype": "float32",
              "complete": True, "shards": shards, "pieces": metas,
              "timing": {"seconds": 2.0, "extract_seconds": 1.5, "pieces_per_s": 8.0, "peak_rss_bytes": 123456789,
                         "device": "cpu", "cpu": "x86_64", "threads": 2, "torch": torch.__version__, "gpu": None}
              }).save(gdir / "manifest.json")
    couple(cfg, run, show_progress=False)


def _write_synthetic_ripple(run: Path) -> dict:
    """A made-up ripple/ (not measured): two edits, predictions linear in the cosine."""
    ids, cos = _load(run).ids, torch.load(run / "coupling" / "cosine.pt", weights_only=True)["cosine"]
    q = {p.id: p.question_id for p in _pieces()}
    rows, edits = [], []
    for e, i in enumerate([0, 4]):
        for j, pid in enumerate(ids):
            if j != i:
                c = float(cos[i, j])
                rows.append({"edit": e, "edited_id": ids[i], "piece_id": pid, "same_question": q[pid] == q[ids[i]],
                             "cosine": c, "predicted_coupling": 2 * c, "predicted_first_order": None if j == 3 else c - 0.1,
                             "measured": c + 0.01 * j})
        edits.append({"piece_id": ids[i], "question_id": q[ids[i]], "prompt": "p", "answer": "a",
                      "new_answer": "SYNTHETIC<i>", "counterfactual_source": "substitute",
                      "logprob_new_before": -9.0, "logprob_new_after": -0.5, "logprob_true_before": -1.0,
                      "logprob_true_after": -7.0, "success": e == 0, "spearman_coupling": 0.4 + e / 10,
                      "spearman_first_order": None, "pearson_first_order": 0.3, "precision_at_k": 0.5, "k": 4,
                      "mean_abs_measured_same_question": 0.2, "mean_abs_measured_cross_question": 0.05,
                      "restored": True, "seconds": 0.1})
    summary = {"method": "finetune", "steps": 3, "lr": 1e-3, "n_edits": 2, "seconds": 0.2, "device": "cpu",
               "spearman_coupling_mean": 0.45, "spearman_first_order_mean": None,
               "pooled": {"spearman_coupling": 0.61, "spearman_first_order": 0.52, "pearson_first_order": None,
                          "n_points": len(rows)}, "edits": edits}
    (run / "ripple").mkdir()
    (run / "ripple" / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (run / "ripple" / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return summary


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("report") / "run"
    _write_run(run, RunConfig())
    _write_synthetic_ripple(run)
    return run


@pytest.fixture
def run(template, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(template, dst)
    return dst


def _json(p: Path) -> dict:
    return json.loads(p.read_text(encoding="utf-8"))


def test_summary_has_the_nine_sections_with_the_run_figures(run):
    s = build_summary(run)
    assert tuple(s) == SECTIONS and len(SECTIONS) == 9
    stats = _json(run / "coupling" / "stats.json")
    man = _json(run / "gradients" / "manifest.json")

    meta = s["metadata"]
    assert meta["model"]["name"] == "toy-random" and meta["n_params"] == 48 and meta["n_pieces"] == 10
    assert meta["datasets"] == ["other", "toy"] and meta["config_hash"] == "feedc0de"
    assert [t["name"] for t in meta["targets"]] == ["blk.0.fc", "blk.1.fc"]

    kp = s["knowledge_pieces"]
    assert kp["count"] == 10 and kp["n_questions"] == 4 and kp["with_counterfactual"] == 3
    assert kp["per_kind"] == {"single_hop": 6, "multi_hop": 3, "cloze": 1}
    assert kp["per_dataset"] == {"toy": 9, "other": 1}
    assert kp["mean_answer_tokens"] == pytest.approx(1.5)

    ga = s["gradient_analysis"]
    shard_bytes = sum((run / "gradients" / sh["file"]).stat().st_size for sh in man["shards"])
    assert ga["n_shards"] == 3 and ga["shard_bytes"] == shard_bytes
    assert ga["bytes_per_piece"] == pytest.approx(shard_bytes / 10)
    assert ga["logprob_nats"]["mean"] == pytest.approx(sum(-1.5 - k for k in range(10)) / 10)
    assert ga["logprob_nats"]["max"] == pytest.approx(-1.5)
    norms = [sum(m["sq_norm"].values()) ** 0.5 for m in man["pieces"]]
    assert ga["grad_norm"]["max"] == pytest.approx(max(norms))

    ca = s["coupling_analysis"]
    assert ca["mean"] == stats["mean"] and ca["pairs"] == 45 and ca["mode"] == "full"
    assert ca["same_question"] == stats["same_question"]

    with open(run / "coupling" / "pairs.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    hp = s["high_coupling_pairs"]
    assert len(hp) == 10 and [p["id_a"] for p in hp] == [r["id_a"] for r in rows[:10]]
    assert hp[0]["cosine"] == pytest.approx(float(rows[0]["cosine"])) and hp[0]["rank"] == 1

    cp = s["cross_pot_analysis"]
    same, cross = stats["same_question"], stats["cross_question"]
    assert cp["same_question"]["pairs"] == same["pairs"] == 9 and cp["cross_question"]["pairs"] == 36
    assert cp["difference"] == pytest.approx(same["mean"] - cross["mean"]) and cp["difference"] > 0
    cos = torch.load(run / "coupling" / "cosine.pt", weights_only=True)["cosine"]
    q2 = [i for i, m in enumerate(man["pieces"]) if m["question_id"] == "q2"]
    want = sum(float(cos[a, b]) for k, a in enumerate(q2) for b in q2[k + 1:]) / 3
    got = {q["question_id"]: q for q in cp["top_questions"]}
    assert set(got) == {"q1", "q2", "q10"} and got["q2"]["mean"] == pytest.approx(want)
    assert got["q2"]["question"] == "Whole question 2?"
    means = [q["mean"] for q in cp["top_questions"]]
    assert means == sorted(means, reverse=True)

    perf = s["gpu_performance"]
    assert perf["device"] == "cpu" and perf["gpu"] is None and perf["note"] == "no GPU: ran on CPU"
    assert perf["pieces_per_s"] == 8.0 and perf["extract_seconds"] == 1.5 and perf["peak_gpu_memory_bytes"] is None

    r = s["experiment_readiness"]
    assert r["gradients_complete"] and r["coupling_done"] and r["ripple_done"] and not r["report_written"]
    assert r["ripple_spearman_coupling_mean"] == 0.45 and r["ripple_spearman_first_order_mean"] is None
    assert r["ripple_pooled_spearman_coupling"] == 0.61 and r["ripple_success_rate"] == 0.5


def test_report_writes_both_files_and_lists_every_file_with_its_size(run):
    res = report(RunConfig(), run)
    assert res.index_html == run / "report" / "index.html" and res.summary_json == run / "report" / "summary.json"
    on_disk = _json(res.summary_json)
    assert on_disk == res.summary and tuple(on_disk) == SECTIONS
    assert on_disk["experiment_readiness"]["report_written"] is True
    gf = on_disk["generated_files"]
    listed = {f["path"]: f["bytes"] for f in gf["files"]}
    actual = {p.relative_to(run).as_posix(): p.stat().st_size for p in run.rglob("*") if p.is_file()}
    assert listed == actual  # including report/summary.json's own size, and no temp files
    assert gf["n_files"] == len(actual) and gf["total_bytes"] == sum(actual.values())
    assert {"coupling/cosine.pt", "ripple/edits.jsonl", "report/index.html"} <= set(listed)


def test_html_is_self_contained_with_three_figures_and_escaped_texts(run):
    summary = build_summary(run)
    page = render_html(run, summary, RunConfig())
    assert page.startswith("<!DOCTYPE html>") and "<meta charset='utf-8'>" in page
    assert '<script src="http' not in page and "<script src=" not in page
    assert page.count("Plotly.newPlot(") == 3  # heatmap, distribution, ripple
    assert page.count("window.Plotly") >= 1 and len(page) > 1_000_000  # the plotly.js bundle, inline
    for fid in ("fig-heatmap", "fig-distribution", "fig-ripple"):
        assert f'id="{fid}"' in page
    assert NASTY not in page and "&lt;b&gt;Tom &amp; &quot;Jerry&quot;&lt;/b&gt;" in page
    assert "SYNTHETIC&lt;i&gt;" in page and "SYNTHETIC<i>" not in page
    for term in ("GradSim", "Spearman&#x27;s ρ", "precision@k", "nats"):
        assert term in page
    assert page.count("<dt>precision@k</dt>") == 1
    assert "CPU only — no GPU was used" in page
    assert "pooled Spearman's \\u03c1 = 0.610" in page  # the ripple figure's title, in the figure's JSON
    assert f"{summary['coupling_analysis']['mean']:.4f}" in page


def test_without_ripple_the_report_says_so(run):
    shutil.rmtree(run / "ripple")
    res = report(RunConfig(), run)
    r = res.summary["experiment_readiness"]
    assert r["ripple_done"] is False and r["ripple_spearman_coupling_mean"] is None
    assert r["next_step"] == f"gradcouple ripple --run {run}"
    page = res.index_html.read_text(encoding="utf-8")
    assert "Ripple was not run" in page and 'id="fig-ripple"' not in page
    assert page.count("Plotly.newPlot(") == 2 and '<script src="http' not in page


@pytest.mark.parametrize("missing, names, command", [
    ("coupling/cosine.pt", "cosine.pt", "gradcouple couple --run"),
    ("coupling/stats.json", "stats.json", "gradcouple couple --run"),
    ("coupling/pairs.csv", "pairs.csv", "gradcouple couple --run"),
    ("gradients/manifest.json", "manifest.json", "gradcouple extract --out"),
])
def test_missing_inputs_raise_artifact_error_naming_file_and_command(run, missing, names, command):
    (run / missing).unlink()
    with pytest.raises(ArtifactError) as ei:
        build_summary(run)
    assert names in str(ei.value) and command in str(ei.value)
    with pytest.raises(ArtifactError):
        report(RunConfig(), run)
    assert not (run / "report").exists()


def test_stale_coupling_is_refused(run):
    stats = _json(run / "coupling" / "stats.json")
    stats["config_hash"] = "0000000000000000"
    (run / "coupling" / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    with pytest.raises(ArtifactError, match="stale coupling"):
        build_summary(run)


def test_topk_coupling_and_heatmap_cap(tmp_path):
    cfg = RunConfig.model_validate({"couple": {"top_k": 3}, "report": {"max_heatmap": 4}})
    run = tmp_path / "run"
    _write_run(run, cfg)
    assert (run / "coupling" / "topk.pt").is_file() and not (run / "coupling" / "cosine.pt").exists()
    res = report(cfg, run)
    s = res.summary
    assert s["coupling_analysis"]["mode"] == "top3" and s["coupling_analysis"]["matrix"] == "coupling/topk.pt"
    assert s["cross_pot_analysis"]["source"].startswith("nearest-neighbour")
    page = res.index_html.read_text(encoding="utf-8")
    assert "first 4 pieces" in page and "Top-k coupling" in page and "Ripple was not run" in page

    # ordered by question id (naturally: q1, q2, q10, x), then hop, the whole question last
    fig, shown = _heatmap(_load(run), 4)
    assert shown == 4
    assert list(fig.data[0].x) == list(fig.layout.xaxis.tickvals)
    assert list(fig.layout.xaxis.ticktext) == ["toy:q1:0", "toy:q1:1", "toy:q1:q", "toy:q2:0"]
    z = fig.data[0].z
    assert all(z[i][i] == 1.0 for i in range(4))


def test_cli_writes_report_and_prints_index_path_last(run):
    res = CliRunner().invoke(app, ["report", "--run", str(run), "--max-heatmap", "5"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(run / "report" / "index.html")
    assert (run / "report" / "summary.json").is_file()
    assert "first 5 pieces" in (run / "report" / "index.html").read_text(encoding="utf-8")


def test_cli_missing_coupling_exits_with_artifact_code(run):
    shutil.rmtree(run / "coupling")
    res = CliRunner().invoke(app, ["report", "--run", str(run)])
    assert res.exit_code == ArtifactError.exit_code
    assert "stats.json" in res.output and "gradcouple couple" in res.output
