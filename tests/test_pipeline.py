"""End to end: `gradcouple run` on real records with the real default model (SmolLM2-135M)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from gradcouple.cli import app
from gradcouple.pieces import read_pieces

SECTIONS = ["metadata", "knowledge_pieces", "gradient_analysis", "coupling_analysis", "high_coupling_pairs",
            "cross_pot_analysis", "generated_files", "gpu_performance", "experiment_readiness"]


@pytest.mark.slow
def test_run_real_model_real_records(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--datasets", "musique,mquake-hard", "--limit", "24", "--edits", "2",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(out / "report" / "index.html")
    for f in ["config.json", "pieces.jsonl", "gradients/manifest.json", "gradients/shard-00000.pt",
              "coupling/cosine.pt", "coupling/gram.pt", "coupling/pairs.csv", "coupling/stats.json",
              "ripple/edits.jsonl", "ripple/summary.json", "report/index.html", "report/summary.json"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    pieces = read_pieces(out / "pieces.jsonl")
    assert len(pieces) == 24 and {p.dataset for p in pieces} <= {"musique", "mquake-hard"}
    assert {p.kind.value for p in pieces} >= {"single_hop", "multi_hop"}
    man = json.loads((out / "gradients/manifest.json").read_text())
    assert man["model"]["name"] == "smollm2-135m" and man["model"]["architecture"] == "llama"
    assert man["n_params"] == 4 * 576 * 1536
    lp = torch.tensor([m["logprob"] for m in man["pieces"]])
    assert (lp < 0).all() and torch.isfinite(lp).all()
    cos = torch.load(out / "coupling/cosine.pt", weights_only=True)["cosine"]
    assert cos.shape == (24, 24) and torch.allclose(cos.diagonal(), torch.ones(24, dtype=cos.dtype), atol=1e-6)
    assert torch.allclose(cos, cos.t())
    stats = json.loads((out / "coupling/stats.json").read_text())
    assert stats["same_question"]["pairs"] > 0 and stats["cross_question"]["pairs"] > 0
    rows = list(csv.DictReader(open(out / "coupling/pairs.csv", encoding="utf-8")))
    assert rows and float(rows[0]["cosine"]) == pytest.approx(float(cos.triu(1).max()), abs=1e-5)
    rip = json.loads((out / "ripple/summary.json").read_text())
    assert rip["n_edits"] == 2 and all(e["restored"] for e in rip["edits"])
    assert all(e["logprob_new_after"] > e["logprob_new_before"] for e in rip["edits"])
    assert rip["baseline_logprob_max_abs_diff_vs_manifest"] < 1e-3
    assert -1 <= rip["spearman_first_order_mean"] <= 1
    summary = json.loads((out / "report/summary.json").read_text())
    assert list(summary)[:9] == SECTIONS
    assert summary["coupling_analysis"]["mean"] == pytest.approx(stats["mean"])
    html = (out / "report/index.html").read_text(encoding="utf-8")
    assert "<script src=\"http" not in html and html.count("plotly-graph-div") >= 3
