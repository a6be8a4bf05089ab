"""The one config resolver: the CLI and the Python API take the same keywords and refuse the same
things with the same line; a config file is checked like flags; every stage, `run` included,
starts from the run's saved config; help texts and configs/default.yaml come from the field
descriptions; nothing writes into a config it was handed."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from conftest import write_fact_pieces
from typer.testing import CliRunner

import gradcouple as gc
from gradcouple.cli import app
from gradcouple.config import RunConfig
from gradcouple.edits import METHODS
from gradcouple.errors import ConfigError
from gradcouple.resolve import STAGE_KEYWORDS, help_text, keyword_field, resolve

runner = CliRunner()
TINY = "llama-tiny-random"
NOT_SETTINGS = {"run", "out", "config", "overwrite", "open_page", "datasets", "no_ripple"}  # options, not RunConfig fields
#: a stage's own options that are its inputs, not settings
INPUTS = {"forecast": {"edits", "edit", "target", "subject", "format", "skip_bad"}}


def _command(stage: str):
    return typer.main.get_command(app).commands[stage]


@pytest.mark.parametrize("stage", sorted(STAGE_KEYWORDS))
def test_the_cli_options_are_the_stage_keywords(stage):
    options = {p.name for p in _command(stage).params} - NOT_SETTINGS - INPUTS.get(stage, set()) - {"help"}
    assert options == set(STAGE_KEYWORDS[stage])


@pytest.mark.parametrize("stage", sorted(STAGE_KEYWORDS))
def test_every_option_help_is_its_field_description(stage):
    for p in _command(stage).params:
        if p.name in STAGE_KEYWORDS[stage]:
            dotted = keyword_field(stage, p.name)
            if dotted.startswith("ripple.hparams.*."):
                knob = dotted.rsplit(".", 1)[1]
                dotted = next(f"ripple.hparams.{m}.{knob}" for m, c in METHODS.items() if knob in c.Hparams.model_fields)
            assert p.help == help_text(dotted), (stage, p.name)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Fact pieces extracted (tiny LLaMA, last4) and coupled: the run the refusals below are made on."""
    root = tmp_path_factory.mktemp("resolve")
    write_fact_pieces(root / "p.jsonl")
    gc.extract(root / "run", data=root / "p.jsonl", model=TINY)
    gc.couple(root / "run")
    return root


def _refusals(root):
    run, p = str(root / "run"), str(root / "p.jsonl")
    return [
        ("ripple", ["--run", run, "--method", "rome", "--lr", "1e-3"], dict(method="rome", lr=1e-3)),
        ("ripple", ["--run", run, "--clamp-norm-factor", "2"], dict(clamp_norm_factor=2.0)),
        ("ripple", ["--run", run, "--sweep", "1e-4,1e-3"], dict(sweep="1e-4,1e-3")),
        ("ripple", ["--run", run, "--method", "memo"], dict(method="memo")),
        ("couple", ["--run", run, "--layers", "all"], dict(layers="all")),
        ("couple", ["--run", run, "--max-length", "64"], dict(max_length=64)),
        ("couple", ["--run", run, "--device", "mps"], dict(device="mps")),
        ("extract", ["--out", str(root / "x"), "--data", p, "--proj-dim", "8"], dict(data=p, proj_dim=8)),
        ("run", ["--out", str(root / "y"), "--no-ripple", "--n-edits", "3"], dict(no_ripple=True, n_edits=3)),
        ("run", ["--out", str(root / "y"), "--data", p, "--datasets", "musique"], dict(data=p, datasets=["musique"])),
    ]


def test_the_api_refuses_what_the_cli_refuses_with_the_same_line(tiny_run):
    for stage, args, kwargs in _refusals(tiny_run):
        res = runner.invoke(app, [stage, *args])
        assert res.exit_code == 2, (args, res.output)
        line = res.output.strip()
        assert line.startswith("error: ") and "\n" not in line, res.output
        where = args[args.index("--run" if "--run" in args else "--out") + 1]
        with pytest.raises(ConfigError) as e:
            getattr(gc, stage)(where, **kwargs)
        assert str(e.value) == line.removeprefix("error: "), stage


def test_a_config_file_is_checked_like_the_same_flags(tiny_run, tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  layers: last2\nextract:\n  max_length: 64\n")
    res = runner.invoke(app, ["couple", "--run", str(tiny_run / "run"), "--config", str(tmp_path / "c.yaml")])
    assert res.exit_code == 2
    assert res.output.startswith(f"error: --layers last2 (in {tmp_path / 'c.yaml'}): the gradients in ")
    with pytest.raises(ConfigError, match=r"--max-length 64 \(in .*c\.yaml\): the gradients in .* were extracted with "
                                          r"--max-length 256"):
        resolve("couple", tiny_run / "run", config=tmp_path / "c.yaml", layers="last4")


def test_the_extractions_own_settings_pass(tiny_run):
    cfg = resolve("couple", tiny_run / "run", layers="last4", max_length=256, data=tiny_run / "p.jsonl", top_k=3)
    assert (cfg.model.layers, cfg.couple.top_k) == ("last4", 3)


def test_run_starts_from_the_runs_saved_config_like_every_stage(tmp_path):
    saved = RunConfig()
    saved.couple.top_pairs, saved.ripple.n_edits = 7, 4
    saved.save(tmp_path / "config.json")
    for stage in ("run", "couple", "ripple"):
        cfg = resolve(stage, tmp_path)
        assert (cfg.couple.top_pairs, cfg.ripple.n_edits) == (7, 4), stage


def test_a_knob_flag_sets_the_chosen_methods_knob_and_a_config_file_may_hold_every_methods(tmp_path):
    (tmp_path / "c.yaml").write_text("ripple:\n  hparams:\n    ft: {lr: 0.01}\n    rome: {clamp_norm_factor: 2.0}\n")
    cfg = resolve("ripple", tmp_path, config=tmp_path / "c.yaml", method="rome")
    assert cfg.ripple.hparams == {"ft": {"lr": 0.01}, "rome": {"clamp_norm_factor": 2.0}}
    assert resolve("ripple", tmp_path, steps=3).ripple.hparams == {"ft": {"steps": 3}}
    with pytest.raises(ConfigError, match=r"--steps 0: Input should be greater than or equal to 1"):
        resolve("ripple", tmp_path, steps=0)


def test_legacy_flat_knobs_and_the_old_method_name_still_load(tmp_path):
    (tmp_path / "config.json").write_text('{"ripple": {"method": "finetune", "lr": 0.002, "rome_clamp": 3.0}}')
    cfg = resolve("ripple", tmp_path)
    assert (cfg.ripple.method, cfg.ripple.hparams) == ("ft", {"ft": {"lr": 0.002}, "rome": {"clamp_norm_factor": 3.0}})


def test_nothing_writes_into_a_config_it_was_handed(tmp_path):
    cfg = RunConfig()
    before = cfg.model_dump()
    out = resolve("run", tmp_path, cfg=cfg, model=TINY, n_edits=2)
    assert cfg.model_dump() == before and (out.model.name, out.ripple.n_edits) == (TINY, 2)


def test_the_shipped_default_config_passes_every_stage_and_is_checked_against_a_run(tiny_run, tmp_path):
    path = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    for stage in STAGE_KEYWORDS:
        assert resolve(stage, tmp_path / "new", config=path).model.name == "smollm2-135m"
    assert resolve("couple", tiny_run / "run", config=path).couple == RunConfig().couple  # defaults set nothing
    (tmp_path / "c.yaml").write_text("model:\n  name: smollm2-135m\n  layers: last4\n  module: mlp.down_proj\n")
    with pytest.raises(ConfigError, match=r"--module mlp.down_proj \(in .*c\.yaml\): the gradients in .* were "
                                          r"extracted with --module none"):
        resolve("couple", tiny_run / "run", config=tmp_path / "c.yaml")
