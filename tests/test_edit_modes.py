"""How benchmark edits are made and counted on a tiny model: the success rule and the field's metrics
(checked against the records and an independent forward), batches, sequences, the layer sweep,
GradSim on a subset of the extracted layers, the extraction of the edited blocks, and --hparams."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_benchmark import coupled_edit_run
from typer.testing import CliRunner

from gradcouple.cli.app import app
from gradcouple.config import RunConfig
from gradcouple.errors import ConfigError
from gradcouple.rundir import RunDir
from gradcouple.scoring import encode
from gradcouple.stages.couple import couple
from gradcouple.stages.ripple import ripple

FAST_ROME = {"v_num_grad_steps": 2, "context_template_length_params": [[5, 5]]}
runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_llama_loaded):
    """Four benchmark edits (two tests each) extracted at every block of the tiny LLaMA and coupled."""
    root = tmp_path_factory.mktemp("modes")
    cfg = coupled_edit_run(root, n_edits=4, tests_per_edit=2, steps=3, covariance_tokens=1000, resamples=20)
    return cfg, root


def _copy(made, tmp_path, **ripple_settings) -> tuple[RunConfig, object]:
    cfg, root = made
    shutil.copytree(root / "run", tmp_path / "run")
    cfg = cfg.model_copy(deep=True)
    for k, v in ripple_settings.items():
        setattr(cfg.ripple, k, v)
    return cfg, tmp_path / "run"


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_efficacy_counts_only_edits_not_already_satisfied_and_portability_is_the_token_accuracy(made, tmp_path,
                                                                                              tiny_llama_loaded):
    cfg, run = _copy(made, tmp_path)
    s = ripple(cfg, run, loaded=tiny_llama_loaded, show_progress=False).summary
    m = s.metrics
    counted = [e for e in s.edits if not (e.already_satisfied or e.same_target)]
    assert all(e.already_satisfied == (e.logprob_new_before > e.logprob_true_before) for e in s.edits)
    assert (m.n_edits, m.n_counted, m.n_successful_counted) == (4, len(counted), sum(e.success for e in counted))
    assert m.efficacy == (sum(e.success for e in counted) / len(counted) if counted else None)
    _, rows = RunDir(run).ripple.load()
    ok = [t for t in rows if t.edit_success]
    assert m.portability["pooled"] == (pytest.approx(sum(t.token_accuracy_after for t in ok) / len(ok)) if ok else None)
    # token accuracy before the edit, independently: the model's own full forward, argmax at each answer position
    lm, pieces = tiny_llama_loaded, RunDir(run).load_pieces()
    by_id = {p.id: p for p in pieces}
    for t in rows[:4]:
        p = by_id[t.test_id]
        enc = encode(lm.tokenizer, *p.render_answer(p.answer, cfg.data.prompt_template), cfg.extract.max_length)
        with torch.no_grad():
            logits = lm.model(torch.tensor([list(enc.ids)])).logits[0]
        top = logits[enc.answer_start - 1:len(enc.ids) - 1].argmax(-1)
        assert t.token_accuracy_before == pytest.approx(float((top == torch.tensor(enc.ids[enc.answer_start:])).double().mean()))
    assert 0 <= m.locality.min <= m.locality.max <= 1 if m.locality.n else True
    assert s.method_source == "the method's defaults"


def test_a_batch_is_made_at_once_and_the_weights_come_back(made, tmp_path, tiny_llama_loaded):
    cfg, run = _copy(made, tmp_path, batch_size=2)
    before = _state(tiny_llama_loaded.model)
    s = ripple(cfg, run, loaded=tiny_llama_loaded, show_progress=False).summary
    assert [e.batch for e in s.edits] == [0, 0, 2, 2]
    assert s.edits[0].edit_norm == s.edits[1].edit_norm != s.edits[2].edit_norm  # one weight change per batch
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama_loaded.model.state_dict().items())
    assert s.retention == []


def test_a_sequence_measures_every_earlier_edit_after_each_batch(made, tmp_path, tiny_llama_loaded):
    cfg, run = _copy(made, tmp_path, sequential=True)
    before = _state(tiny_llama_loaded.model)
    s = ripple(cfg, run, loaded=tiny_llama_loaded, show_progress=False).summary
    assert [p.n_edits_made for p in s.retention] == [1, 2, 3, 4]
    last = s.retention[-1]
    assert last.n_counted == sum(not (e.already_satisfied or e.same_target) for e in s.edits)
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama_loaded.model.state_dict().items())


def test_the_layer_sweep_edits_each_block_and_writes_its_table(made, tmp_path, tiny_llama_loaded):
    cfg, run = _copy(made, tmp_path, method="rome", hparams={"rome": FAST_ROME}, layer_sweep="0-3")
    res = ripple(cfg, run, loaded=tiny_llama_loaded, show_progress=False)
    sw = res.layer_sweep
    assert [p.layers for p in sw.points] == [[0], [1], [2], [3]] and all(p.n_edits == 4 for p in sw.points)
    assert all(p.n_counted == 4 - p.n_already_satisfied - p.n_same_target for p in sw.points)
    assert res.path.name == "layer_sweep.json" and RunDir(run).ripple.sets()[-1].load_layer_sweep() == sw


def test_a_layer_sweep_beyond_the_model_is_refused_naming_its_flag(made, tmp_path, tiny_llama_loaded):
    cfg, run = _copy(made, tmp_path, method="rome", hparams={"rome": FAST_ROME}, layer_sweep="2-6")
    with pytest.raises(ConfigError, match=r"^--layer-sweep '2-6': block indices must lie in 0\.\.3 \(got \[4, 5, 6\]\)"):
        ripple(cfg, run, loaded=tiny_llama_loaded, show_progress=False)


def test_gradsim_over_a_subset_of_the_extracted_layers(made, tmp_path):
    cfg, run = _copy(made, tmp_path)
    full = RunDir(run).coupling.load_cosine()[1]
    cfg.couple.layers = "2-3"
    stats = couple(cfg, run, show_progress=False).stats
    assert stats.layers.names == ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    assert not torch.allclose(RunDir(run).coupling.load_cosine()[1], full)
    cfg.couple.layers = "5"
    with pytest.raises(ConfigError, match=r"^--couple-layers 5: the extraction in .* has blocks 0-3; choose among them\.$"):
        couple(cfg, run, show_progress=False)


def test_ripple_refuses_blocks_the_extraction_lacks_in_one_line(made, tmp_path):
    cfg, root = made
    write = (root / "p.jsonl").read_text()
    (tmp_path / "p.jsonl").write_text(write)
    res = runner.invoke(app, ["extract", "--data", str(tmp_path / "p.jsonl"), "--model", "llama-tiny-random",
                              "--layers", "2-3", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["couple", "--run", str(tmp_path / "r")]).exit_code == 0
    res = runner.invoke(app, ["ripple", "--run", str(tmp_path / "r"), "--method", "rome", "--edit-layers", "1"])
    lines = res.output.strip().splitlines()
    assert res.exit_code != 0 and len(lines) == 1, res.output
    assert "--method rome edits block 1, whose gradients the extraction lacks (it has blocks 2-3); extract with " \
           "--layers 1-3" in lines[0]


def test_run_extracts_the_edited_blocks_and_keeps_gradsim_on_the_chosen_ones(made, tmp_path):
    cfg, root = made
    (tmp_path / "c.yaml").write_text("ripple:\n  hparams:\n    rome: {v_num_grad_steps: 2, "
                                     "context_template_length_params: [[5, 5]]}\n")
    res = runner.invoke(app, ["run", "--data", str(root / "p.jsonl"), "--model", "llama-tiny-random", "--layers", "last2",
                              "--method", "rome", "--n-edits", "1", "--config", str(tmp_path / "c.yaml"),
                              "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    run = RunDir(tmp_path / "r")
    assert run.gradients.load_manifest().names == [f"model.layers.{b}.mlp.down_proj" for b in (1, 2, 3)]
    assert run.coupling.load_stats().layers.names == [f"model.layers.{b}.mlp.down_proj" for b in (2, 3)]
    assert run.ripple.latest().load()[0].hparams["layers"] == [1]


def test_a_settings_file_sets_the_knobs_and_is_named_in_the_summary(made, tmp_path, tiny_llama_loaded):
    path = tmp_path / "rome.yaml"
    path.write_text('alg_name: "ROME"\nlayers: [2]\nv_num_grad_steps: 2\nclamp_norm_factor: 2\n'
                    'context_template_length_params: [[5, 5]]\nrewrite_module_tmp: "model.layers.{}.mlp.down_proj"\n')
    cfg, run = _copy(made, tmp_path, method="rome", hparams_file=path, hparams={"rome": {"clamp_norm_factor": 3.0}})
    s = ripple(cfg, run, loaded=tiny_llama_loaded, show_progress=False).summary
    assert (s.hparams["layers"], s.hparams["clamp_norm_factor"], s.method_source) == ([2], 3.0, str(path))
    assert s.layer == "model.layers.2.mlp.down_proj"
