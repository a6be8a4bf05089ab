"""The one freshness rule: edited pieces, a changed flag, changed model weights or a replaced
upstream artifact always recompute or refuse, naming what changed, and never reuse silently."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import write_fact_pieces
from typer.testing import CliRunner

from gradcouple.cli import app
from gradcouple.config import RunConfig
from gradcouple.stages.couple import couple
from gradcouple.errors import ArtifactError, ConfigError
from gradcouple.stages.extract import ensure_extraction, extract
from gradcouple.models import byte_level_tokenizer
from gradcouple.stages.report import report
from gradcouple.stages.ripple import ripple
from gradcouple.rundir import RunDir

runner = CliRunner()


def _edit_answer(path, piece_id, new_answer):
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    for obj in lines:
        if obj["id"] == piece_id:
            obj["answer"] = new_answer
    path.write_text("".join(json.dumps(o) + "\n" for o in lines), encoding="utf-8")


def _cfg(pieces, model="llama-tiny-random") -> RunConfig:
    cfg = RunConfig()
    cfg.data.pieces = pieces
    cfg.model.name = model
    cfg.ripple.n_edits = 1
    cfg.ripple.hparams = {"ft": {"steps": 1}}
    cfg.couple.method = "factored"
    return cfg


def _tiny_llama_dir(path, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_level_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).save_pretrained(path)
    tok.save_pretrained(path)


def test_couple_model_reextracts_after_the_pieces_file_is_edited(tmp_path, monkeypatch):
    """The stale-gradient bug: `couple --model M --data p.jsonl` reused the old gradients after an answer was edited."""
    monkeypatch.chdir(tmp_path)
    write_fact_pieces(tmp_path / "p.jsonl")
    args = ["couple", "--model", "llama-tiny-random", "--data", "p.jsonl"]
    assert runner.invoke(app, args).exit_code == 0
    _edit_answer(tmp_path / "p.jsonl", "facts:q3:1", "Neptune")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "stale" in res.output and "pieces file" in res.output
    (run,) = (tmp_path / "runs").iterdir()
    answers = {r.id: r.answer for r in RunDir(run).gradients.load_manifest().records()}
    assert answers["facts:q3:1"] == " Neptune"


def test_couple_model_reuses_a_current_extraction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_fact_pieces(tmp_path / "p.jsonl")
    args = ["couple", "--model", "llama-tiny-random", "--data", "p.jsonl"]
    first = runner.invoke(app, args)
    (run,) = (tmp_path / "runs").iterdir()
    shards = [s.sha256 for s in RunDir(run).gradients.load_manifest().shards]
    again = runner.invoke(app, args)
    assert "extracted first" in first.output and "extract" not in again.output.split("couple")[0]
    assert [s.sha256 for s in RunDir(run).gradients.load_manifest().shards] == shards


def test_changed_flag_is_refused_naming_the_setting(tmp_path):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    extract(cfg, tmp_path / "run", show_progress=False)
    cfg.extract.max_length = 64
    with pytest.raises(ConfigError, match=r"extract\.max_length: 256 -> 64"):
        ensure_extraction(cfg, tmp_path / "run", show_progress=False)


def test_changed_flag_recomputes_when_replacing_is_allowed(tmp_path):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    extract(cfg, tmp_path / "run", show_progress=False)
    cfg.model.layers = "last2"
    res = ensure_extraction(cfg, tmp_path / "run", replace_stale=True, show_progress=False)
    assert not res.reused and any("model.layers" in c for c in res.changed)
    assert len(RunDir(tmp_path / "run").gradients.load_manifest().targets) == 2


def test_edited_pieces_are_refused_without_overwrite(tmp_path):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    extract(cfg, tmp_path / "run", show_progress=False)
    _edit_answer(tmp_path / "p.jsonl", "facts:q2:0", "Lyon")
    with pytest.raises(ConfigError, match="pieces file"):
        ensure_extraction(cfg, tmp_path / "run", show_progress=False)


def test_changed_model_weights_trigger_reextraction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_fact_pieces(tmp_path / "p.jsonl")
    _tiny_llama_dir(tmp_path / "model", seed=0)
    args = ["couple", "--model", str(tmp_path / "model"), "--data", "p.jsonl"]
    assert runner.invoke(app, args).exit_code == 0
    (run,) = (tmp_path / "runs").iterdir()
    before = RunDir(run).gradients.load_manifest().records()[0].logprob
    _tiny_llama_dir(tmp_path / "model", seed=1)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "model weights" in res.output
    assert RunDir(run).gradients.load_manifest().records()[0].logprob != before


def test_replaced_coupling_matrix_is_refused_by_ripple_and_report(tmp_path):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    for name in ("a", "b"):
        extract(cfg, tmp_path / name, show_progress=False)
    couple(cfg, tmp_path / "a", show_progress=False)
    cfg.couple.method = "dense"  # another algorithm: a matrix equal up to rounding, but another file
    couple(cfg, tmp_path / "b", show_progress=False)
    shutil.copy(tmp_path / "b/coupling/cosine.pt", tmp_path / "a/coupling/cosine.pt")
    with pytest.raises(ArtifactError, match="stale coupling"):
        ripple(cfg, tmp_path / "a", show_progress=False)
    with pytest.raises(ArtifactError, match="stale coupling"):
        report(cfg, tmp_path / "a")


def test_coupling_from_replaced_gradients_is_refused(tmp_path):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    extract(cfg, tmp_path / "run", show_progress=False)
    couple(cfg, tmp_path / "run", show_progress=False)
    cfg.model.layers = "last2"
    extract(cfg, tmp_path / "run", overwrite=True, show_progress=False)
    with pytest.raises(ArtifactError, match=r"stale coupling \(gradients"):
        ripple(cfg, tmp_path / "run", show_progress=False)


def test_ripple_results_from_a_top_k_coupling_name_a_way_out_not_a_loop(tmp_path):
    """report said rerun ripple, ripple refused the top-k coupling: a loop. Now the report leaves the stale
    results out and names the commands that redo them, and those commands work as printed."""
    write_fact_pieces(tmp_path / "p.jsonl")
    run = tmp_path / "run"
    assert runner.invoke(app, ["couple", "--run", str(run), "--model", "llama-tiny-random", "--data",
                               str(tmp_path / "p.jsonl")]).exit_code == 0
    assert runner.invoke(app, ["ripple", "--run", str(run), "--n-edits", "1", "--steps", "1"]).exit_code == 0
    res = runner.invoke(app, ["couple", "--run", str(run), "--top-k", "3"])
    assert res.exit_code == 0 and "mean GradSim (each piece's 3 nearest only)" in " ".join(res.output.split())
    res = runner.invoke(app, ["report", "--run", str(run)])
    assert res.exit_code == 0, res.output
    ready = json.loads(RunDir(run).report.summary_path.read_text())["experiment_readiness"]
    assert len(ready["stale_ripple_results"]) == 1 and not ready["ripple_done"]
    assert ready["next_step"].startswith(f"ripple reads the full GradSim matrix: rerun `gradcouple couple --run {run}` "
                                         f"without --top-k, then `gradcouple ripple --run {run}`")
    assert runner.invoke(app, ["couple", "--run", str(run)]).exit_code == 0  # the advice, as printed
    assert runner.invoke(app, ["ripple", "--run", str(run), "--n-edits", "1", "--steps", "1"]).exit_code == 0
    ready = json.loads(RunDir(run).report.summary_path.read_text())["experiment_readiness"] \
        if runner.invoke(app, ["report", "--run", str(run)]).exit_code == 0 else None
    assert ready["ripple_done"] and ready["stale_ripple_results"] == []


def test_replaced_shard_is_refused(tmp_path):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    cfg.extract.shard_size = 4
    extract(cfg, tmp_path / "run", show_progress=False)
    shard = tmp_path / "run/gradients/shard-00000.pt"
    shard.write_bytes((tmp_path / "run/gradients/shard-00001.pt").read_bytes())
    with pytest.raises(ArtifactError, match="shard-00000.pt"):
        couple(cfg, tmp_path / "run", show_progress=False)


def test_a_damaged_shard_is_repaired_by_rerunning_extract_alone(tmp_path):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    cfg.extract.shard_size = 4
    first = extract(cfg, tmp_path / "run", show_progress=False)
    (tmp_path / "run/gradients/shard-00001.pt").write_bytes(b"damaged")
    with pytest.raises(ArtifactError, match="only damaged shards are recomputed"):
        couple(cfg, tmp_path / "run", show_progress=False)
    again = extract(cfg, tmp_path / "run", show_progress=False)
    assert again.resumed_shards == first.n_shards - 1
    couple(cfg, tmp_path / "run", show_progress=False)


def test_a_run_directory_in_use_by_another_process_is_refused_naming_it(tmp_path):
    import json
    import socket
    import subprocess

    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    (tmp_path / "run").mkdir()
    other = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "run/.lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "stage": "extract",
                                                        "started": "now"}))
        with pytest.raises(ArtifactError, match=rf"in use by `gradcouple extract` \(pid {other.pid}"):
            extract(cfg, tmp_path / "run", show_progress=False)
        assert not (tmp_path / "run/gradients").exists()
    finally:
        other.kill()
        other.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    import json
    import socket
    import subprocess

    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    (tmp_path / "run").mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "run/.lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "stage": "extract"}))
    extract(cfg, tmp_path / "run", show_progress=False)
    assert "taking over the lock" in capsys.readouterr().err
    assert not (tmp_path / "run/.lock").exists() and RunDir(tmp_path / "run").gradients.load_manifest().complete


def test_the_same_pieces_under_another_path_are_current(tmp_path):
    import shutil as sh

    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    extract(cfg, tmp_path / "run", show_progress=False)
    (tmp_path / "moved").mkdir()
    sh.copy(tmp_path / "p.jsonl", tmp_path / "moved/p.jsonl")
    cfg.data.pieces = tmp_path / "moved/p.jsonl"
    assert ensure_extraction(cfg, tmp_path / "run", show_progress=False).reused


def test_a_stage_on_a_missing_run_directory_creates_nothing(tmp_path):
    with pytest.raises(ArtifactError, match="no such run directory"):
        report(RunConfig(), tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


def test_non_finite_measurements_survive_the_json_round_trip(tmp_path):
    from gradcouple.artifacts import Measurement

    m = Measurement(edit=0, edited_id="a", piece_id="b", same_question=False, target_answer=False, cosine=0.5,
                    predicted_coupling=float("nan"), predicted_first_order=1.0, measured=float("inf"))
    with open(tmp_path / "line.json", "w") as fh:
        fh.write(m.model_dump_json())
    back = Measurement.model_validate_json((tmp_path / "line.json").read_text())
    assert back.measured == float("inf") and back.predicted_coupling != back.predicted_coupling


def test_couple_with_model_on_a_run_refuses_to_replace_its_gradients_without_overwrite(tmp_path):
    """couple --run R --model M with other settings deleted R's gradients (hours of them on a 7B run)."""
    write_fact_pieces(tmp_path / "p.jsonl")
    run = RunDir(tmp_path / "run")
    base = ["couple", "--run", str(run.root), "--model", "llama-tiny-random", "--data", str(tmp_path / "p.jsonl")]
    assert runner.invoke(app, base).exit_code == 0
    before = {p.name: p.read_bytes() for p in run.gradients.dir.iterdir()}
    res = runner.invoke(app, [*base, "--layers", "last2"])
    assert res.exit_code == 2
    assert res.output.startswith(f"error: {run.gradients.manifest_path}: the gradients in {run.root} were made from other "
                                 f"inputs (model.layers: 'last4' -> 'last2'); pass --overwrite to replace them")
    assert {p.name: p.read_bytes() for p in run.gradients.dir.iterdir()} == before  # nothing deleted
    res = runner.invoke(app, [*base, "--layers", "last2", "--overwrite"])
    assert res.exit_code == 0 and "was stale (model.layers: 'last4' -> 'last2'): extracted again" in " ".join(res.output.split())
    assert len(run.gradients.load_manifest().targets) == 2
