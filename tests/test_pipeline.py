"""End to end: `gradcouple run` on real records (MQuAKE-hard), wired through every stage. The tiny
random LLaMA stands in for the model here: what needs the real default model (its scores, its
gradients, a real edit) is tested in test_real_models.py and test_distributed.py."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gradcouple.cli import app
from gradcouple.stages.report import SECTIONS
from gradcouple.rundir import RunDir

pytestmark = pytest.mark.slow  # the whole `gradcouple run`, end to end

TINY = "llama-tiny-random"
UNIT_DIAGONAL_ATOL = 1e-6
BASELINE_ATOL = 1e-3  # nats: the unedited model re-scores the manifest's log-probs
PAIR_COS_ATOL = 1e-5  # pairs.csv keeps 6 decimals


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    cfg = out.parent / "config.yaml"
    cfg.write_text("ripple:\n  covariance_tokens: 4000\n  bootstrap_resamples: 100\n")
    res = CliRunner().invoke(app, ["run", "--datasets", "mquake-hard", "--limit", "36", "--n-edits", "2",
                                   "--model", TINY, "--config", str(cfg), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, res


def test_run_prints_the_report_path_last(demo_run):
    out, res = demo_run
    assert res.stdout.strip().splitlines()[-1] == str(out / "report" / "index.html")


def test_run_writes_every_artifact(demo_run):
    out, _ = demo_run
    run = RunDir(out)
    for p in [run.config_path, run.pieces_path, run.gradients.manifest_path, run.gradients.shard_path(0), run.coupling.cosine_path, run.coupling.gram_path,
              run.coupling.pairs_path, run.coupling.stats_path, run.ripple.latest().tests_path, run.ripple.latest().summary_path, run.report.index_path,
              run.report.summary_path, run.timing_path]:
        assert p.is_file() and p.stat().st_size > 0, p


def test_run_scores_real_pieces_with_the_model_asked_for(demo_run):
    out, _ = demo_run
    run = RunDir(out)
    pieces = run.load_pieces()
    assert len(pieces) == 36 and {p.dataset for p in pieces} == {"mquake-hard"}
    assert {p.kind.value for p in pieces} >= {"cloze", "multi_hop"}
    man = run.gradients.load_manifest()
    assert man.model.name == TINY and man.model.architecture == "llama"
    assert man.n_params == 4 * 128 * 64  # last4 down_proj of the tiny LLaMA (hidden 64, intermediate 128)
    lp = torch.tensor([r.logprob for r in man.records()])
    assert (lp < 0).all() and torch.isfinite(lp).all()


def test_run_gradsim_is_a_symmetric_unit_diagonal_matrix(demo_run):
    _, cos = RunDir(demo_run[0]).coupling.load_cosine()
    assert cos.shape == (36, 36) and (cos.diagonal() - 1).abs().max() < UNIT_DIAGONAL_ATOL
    assert torch.equal(cos, cos.t())


def test_run_top_pair_is_the_largest_off_diagonal_cosine(demo_run):
    run = RunDir(demo_run[0])
    _, cos = run.coupling.load_cosine()
    assert run.coupling.load_pairs()[0].cosine == pytest.approx(float(cos.triu(1).max()), abs=PAIR_COS_ATOL)


def test_run_evaluates_the_benchmark_edits_the_pieces_carry(demo_run):
    s, rows = RunDir(demo_run[0]).ripple.load()
    assert s.mode == "benchmark" and s.n_edits == 2 and all(e.restored for e in s.edits)
    assert all(e.logprob_new_after > e.logprob_new_before for e in s.edits)
    assert {r.criterion for r in rows} == {"multi_hop"} and len(rows) == 2


def test_run_report_summary_has_the_nine_sections_and_the_coupling_mean(demo_run):
    run = RunDir(demo_run[0])
    summary = json.loads(run.report.summary_path.read_text())
    assert tuple(summary)[:9] == SECTIONS
    assert summary["coupling_analysis"]["pairs"]["all"]["mean"] == pytest.approx(run.coupling.load_stats().pairs.all.mean)


def test_rerun_reuses_the_current_extraction(demo_run):
    out, _ = demo_run
    shards = [s.sha256 for s in RunDir(out).gradients.load_manifest().shards]
    res = CliRunner().invoke(app, ["run", "--datasets", "mquake-hard", "--limit", "36", "--no-ripple",
                                   "--model", TINY, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "reused" in res.output and [s.sha256 for s in RunDir(out).gradients.load_manifest().shards] == shards


def test_piece_mode_on_the_same_run_restores_and_rescores_the_manifest(demo_run):
    out, _ = demo_run
    res = CliRunner().invoke(app, ["ripple", "--run", str(out), "--edits", "pieces", "--n-edits", "2"])
    assert res.exit_code == 0, res.output
    s, rows = RunDir(out).ripple.load()
    assert s.mode == "pieces" and all(e.restored for e in s.edits) and len(rows) == 2 * 35
    assert s.baseline_logprob_max_abs_diff_vs_manifest < BASELINE_ATOL

