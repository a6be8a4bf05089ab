"""The command line: what each command passes to the library, help with examples, and the one
error boundary (one line, documented exit codes). Library calls are patched here; the stages
themselves are specified in their own test files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from gradcouple.cli import app
from gradcouple.config import RunConfig, flag_names, load_config
from gradcouple.edits import method_class
from gradcouple.errors import ArtifactError, ConfigError, DataError, ModelError, NetworkError
from gradcouple.resolve import default_yaml

runner = CliRunner()
COMMANDS = ["download", "extract", "couple", "ripple", "report", "run"]


class Recorder:
    """Stands in for a library stage: records its arguments, returns ``result``."""

    def __init__(self, result=None, raises: BaseException | None = None):
        self.calls, self.result, self.raises = [], result, raises

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.raises is not None:
            raise self.raises
        return self.result


@pytest.fixture
def stages(monkeypatch):
    """Patch every stage the CLI calls; results carry just what the summaries print."""
    import gradcouple.stages.couple as couple_mod
    import gradcouple.stages.extract as extract_mod
    import gradcouple.stages.ripple as ripple_mod
    from gradcouple.metrics import Describe, Interval

    d = Describe(n=1, mean=0.5, std=0.0, min=0.5, median=0.5, max=0.5)
    pairs = SimpleNamespace(all=d, same_question=d, cross_question=d, same_answer=d, different_answer=d,
                            same_question_different_answer=d, cross_question_different_answer=d)
    iv = Interval(estimate=0.3, low=0.1, high=0.5, n=3)
    rec = SimpleNamespace(
        extract=Recorder(SimpleNamespace(resumed_shards=0, n_shards=1, n_pieces=2, seconds=1.0, pieces_per_s=2.0,
                                         bytes_on_disk=10, peak_rss_bytes=10, device=None,
                                         targets=["h.0.mlp.c_proj", "h.1.mlp.c_proj"], truncated=(0, 0, 0),
                                         settings=RunConfig())),
        ensure=Recorder(SimpleNamespace(changed=[], reused=True, run_dir=Path("R"))),
        couple=Recorder(SimpleNamespace(n=2, mode="full", seconds=1.0, out_dir=Path("R/coupling"),
                                        stats_json=Path("R/coupling/stats.json"), stats=SimpleNamespace(pairs=pairs),
                                        extract=None)),
        ripple=Recorder(SimpleNamespace(sweep=None, layer_sweep=None, path=Path("R/ripple/ft-0/summary.json"), summary=SimpleNamespace(
            mode="pieces", n_edits=3, n_successful=2, spearman_coupling=iv, spearman_first_order=iv, precision_at_k=iv,
            pooled=SimpleNamespace(spearman_coupling=0.2), seconds=1.0, resumed_edits=0, device=None))),
    )
    monkeypatch.setattr(extract_mod, "extract", rec.extract)
    monkeypatch.setattr(extract_mod, "ensure_extraction", rec.ensure)
    monkeypatch.setattr(couple_mod, "couple", rec.couple)
    monkeypatch.setattr(ripple_mod, "ripple", rec.ripple)
    return rec


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_help_has_examples(cmd):
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0 and "Examples" in res.output


def test_version_prints_the_installed_packages_version():
    import importlib.metadata

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output == f"gradcouple {importlib.metadata.version('gradcouple')}\n"


@pytest.mark.parametrize("args", [["extract", "--data", "p.jsonl", "--out"], ["run", "--out"],
                                  ["download", "musique", "--sample", "--out"], ["couple", "--run"], ["ripple", "--run"],
                                  ["report", "--run"]])
def test_a_directory_flag_naming_a_file_is_a_bad_option(tmp_path, args):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    res = runner.invoke(app, [*args, str(afile)])
    assert res.exit_code == 2 and res.output.startswith(f"error: {args[-1]} {afile} is a file, not a directory;"), res.output


def test_no_arguments_lists_the_commands():
    res = runner.invoke(app, [])
    assert all(c in res.output for c in COMMANDS)


def test_extract_passes_flags_as_config_fields(stages, tmp_path):
    res = runner.invoke(app, ["extract", "--data", "p.jsonl", "--out", str(tmp_path / "r"), "--model", "gpt2",
                              "--layers", "all", "--store", "dense", "--batch-size", "4", "--shard-size", "8",
                              "--max-length", "64", "--limit", "5", "--overwrite"])
    assert res.exit_code == 0, res.output
    (cfg, out), kwargs = stages.extract.calls[0]
    assert out == tmp_path / "r" and kwargs == {"overwrite": True, "show_progress": True}
    assert (cfg.data.pieces, cfg.data.limit, cfg.model.name, cfg.model.layers) == (Path("p.jsonl"), 5, "gpt2", "all")
    assert (cfg.extract.store, cfg.extract.batch_size, cfg.extract.shard_size, cfg.extract.max_length) == ("dense", 4, 8, 64)


def test_extract_prints_the_manifest_path_last_on_stdout(stages, tmp_path):
    res = runner.invoke(app, ["extract", "--data", "p.jsonl", "--out", str(tmp_path / "r")])
    assert res.stdout.strip().splitlines()[-1] == str(tmp_path / "r" / "gradients" / "manifest.json")


def test_flags_override_the_config_file(stages, tmp_path):
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text("model:\n  name: llama-tiny-random\n  layers: last2\nextract:\n  store: dense\n")
    res = runner.invoke(app, ["extract", "--config", str(cfgf), "--data", "p.jsonl", "--layers", "all", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    (cfg, _), _ = stages.extract.calls[0]
    assert (cfg.model.name, cfg.model.layers, cfg.extract.store) == ("llama-tiny-random", "all", "dense")


def test_later_stages_start_from_the_runs_saved_config(stages, tmp_path):
    saved = RunConfig()
    saved.model.name = "llama-tiny-random"
    saved.couple.top_pairs = 7
    saved.save(tmp_path / "config.json")
    res = runner.invoke(app, ["couple", "--run", str(tmp_path), "--top-k", "3"])
    assert res.exit_code == 0, res.output
    (cfg, run), _ = stages.couple.calls[0]
    assert run == tmp_path and (cfg.model.name, cfg.couple.top_pairs, cfg.couple.top_k) == ("llama-tiny-random", 7, 3)


def test_couple_with_model_extracts_if_needed_in_a_run_named_after_model_and_settings(stages, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["couple", "--model", "org/My Model", "--data", "p.jsonl"])
    assert res.exit_code == 0, res.output
    (cfg, run), kwargs = stages.ensure.calls[0]
    assert run.parent == Path("runs") and run.name == f"org_My_Model-{cfg.extract_hash()[:8]}"
    assert kwargs == {"replace_stale": True, "show_progress": True} and stages.couple.calls[0][0][1] == run


def test_couple_without_run_or_model_names_the_flag(stages):
    res = runner.invoke(app, ["couple"])
    assert res.exit_code == 2 and "--run" in res.output


def test_ripple_passes_its_flags(stages, tmp_path):
    res = runner.invoke(app, ["ripple", "--run", str(tmp_path), "--edits", "pieces", "--n-edits", "4", "--method", "ft",
                              "--steps", "3", "--lr", "0.01", "--max-delta", "0.001", "--seed", "5", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (cfg, run), _ = stages.ripple.calls[0]
    r = cfg.ripple
    assert (run, r.edits, r.n_edits, r.method, r.hparams, r.seed, cfg.model.device) == \
        (tmp_path, "pieces", 4, "ft", {"ft": {"steps": 3, "lr": 0.01, "max_delta": 0.001}}, 5, "cpu")
    res = runner.invoke(app, ["ripple", "--run", str(tmp_path), "--method", "rome", "--clamp-norm-factor", "2"])
    assert res.exit_code == 0, res.output
    r = stages.ripple.calls[1][0][0].ripple
    assert (r.method, r.hparams["rome"]) == ("rome", {"clamp_norm_factor": 2.0})


def test_ripple_accepts_finetune_as_the_old_name_of_ft(stages, tmp_path):
    runner.invoke(app, ["ripple", "--run", str(tmp_path), "--method", "finetune"])
    (cfg, _), _ = stages.ripple.calls[0]
    assert cfg.ripple.method == "ft"


def test_ripple_summary_prints_the_interval(stages, tmp_path):
    res = runner.invoke(app, ["ripple", "--run", str(tmp_path)])
    assert "+0.300 [+0.100, +0.500]" in res.output


def test_run_passes_datasets_and_overwrite(monkeypatch, tmp_path):
    import gradcouple.stages.pipeline as pipeline

    rec = Recorder(raises=DataError("stop here"))
    monkeypatch.setattr(pipeline, "run_pipeline", rec)
    runner.invoke(app, ["run", "--out", str(tmp_path), "--datasets", "musique, mquake", "--n-edits", "2", "--edits", "benchmark",
                        "--method", "rome", "--overwrite"])
    (cfg, out), kwargs = rec.calls[0]
    assert out == tmp_path and (cfg.ripple.n_edits, cfg.ripple.edits, cfg.ripple.method) == (2, "benchmark", "rome")
    assert kwargs == {"datasets": ["musique", "mquake"], "skip_ripple": False, "overwrite": True, "show_progress": True}
    runner.invoke(app, ["run", "--out", str(tmp_path), "--no-ripple"])
    assert rec.calls[1][1]["skip_ripple"] is True


@pytest.mark.parametrize("error", [DataError("d.jsonl:3: field 'answer': empty."), ConfigError("--layers 'x': bad."),
                                   ModelError("--model m: not found."), NetworkError("offline."),
                                   ArtifactError("R/gradients/manifest.json: missing.")])
def test_gradcouple_errors_are_one_line_with_their_exit_code(stages, error, tmp_path):
    stages.extract.raises = error
    res = runner.invoke(app, ["extract", "--data", "p.jsonl", "--out", str(tmp_path)])
    assert res.exit_code == error.exit_code
    assert res.output.strip() == f"error: {error}" and "Traceback" not in res.output


def test_unexpected_exceptions_are_one_line_naming_the_debug_switch(stages, tmp_path):
    stages.extract.raises = ZeroDivisionError("division by zero")
    res = runner.invoke(app, ["extract", "--data", "p.jsonl", "--out", str(tmp_path)])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "ZeroDivisionError" in res.output and "GRADCOUPLE_DEBUG=1" in res.output


def test_os_errors_name_the_file(stages, tmp_path):
    stages.extract.raises = PermissionError(13, "Permission denied", "/ro/run/config.json")
    res = runner.invoke(app, ["extract", "--data", "p.jsonl", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "/ro/run/config.json: Permission denied" in res.output


def test_debug_switch_shows_the_traceback(stages, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADCOUPLE_DEBUG", "1")
    stages.extract.raises = ZeroDivisionError("division by zero")
    res = runner.invoke(app, ["extract", "--data", "p.jsonl", "--out", str(tmp_path)])
    assert isinstance(res.exception, ZeroDivisionError)


def test_interrupt_says_what_resumes(stages, tmp_path):
    stages.extract.raises = KeyboardInterrupt()
    res = runner.invoke(app, ["extract", "--data", "p.jsonl", "--out", str(tmp_path)])
    assert res.exit_code == 130 and "rerun the same command to resume" in res.output


def test_bad_flag_value_names_the_flag(tmp_path):
    res = runner.invoke(app, ["ripple", "--run", str(tmp_path), "--n-edits", "0"])
    assert res.exit_code == 2 and "--n-edits 0" in res.output
    res = runner.invoke(app, ["ripple", "--run", str(tmp_path), "--edits", "some"])
    assert res.exit_code == 2 and "--edits 'some'" in res.output
    res = runner.invoke(app, ["extract", "--data", "x.jsonl", "--store", "bogus", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--store 'bogus'" in res.output


def test_invalid_config_file_value_names_the_field(tmp_path):
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text("extract:\n  store: sparse\n")
    res = runner.invoke(app, ["extract", "--config", str(cfgf), "--data", "x.jsonl", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "extract.store" in res.output


def test_flag_map_covers_every_cli_option_that_sets_a_config_field():
    assert flag_names()["extract.batch_size"] == "--batch-size" and flag_names()["ripple.n_edits"] == "--n-edits"
    assert len(set(flag_names())) == len(flag_names())


def test_shipped_configs_are_valid_and_default_is_the_default():
    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        load_config(f)
    default = load_config(files[[f.name for f in files].index("default.yaml")])
    assert default.model_copy(update={"ripple": default.ripple.model_copy(update={"hparams": {}})}) == RunConfig()
    assert all(method_class(m).resolve(knobs).hp == method_class(m).resolve().hp for m, knobs in default.ripple.hparams.items())
    assert (Path(__file__).parents[1] / "configs" / "default.yaml").read_text(encoding="utf-8") == default_yaml(), \
        "configs/default.yaml drifted from the field descriptions: run `make configs`"


def test_missing_pieces_file_is_a_data_error_naming_it(tmp_path):
    res = runner.invoke(app, ["extract", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r"),
                              "--model", "llama-tiny-random"])
    assert res.exit_code == 2 and "nope.jsonl" in res.output and "gradcouple download" in res.output


def test_couple_without_extraction_is_an_artifact_error(tmp_path):
    res = runner.invoke(app, ["couple", "--run", str(tmp_path)])
    assert res.exit_code == 5 and "gradcouple extract" in res.output


def test_run_without_editable_pieces_still_reports(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "dataset": "x", "question_id": "q", "kind": "cloze", '
                                      '"prompt": "The sky is", "answer": "blue"}\n'
                                      '{"id": "b", "dataset": "x", "question_id": "q", "kind": "cloze", '
                                      '"prompt": "Grass is", "answer": "green"}\n')
    res = runner.invoke(app, ["run", "--data", str(tmp_path / "p.jsonl"), "--model", "llama-tiny-random",
                              "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r/report/index.html").is_file()


def test_library_log_records_print_as_notes_and_warnings(capsys):
    import logging

    from gradcouple.cli.app import show_notes

    show_notes()
    show_notes()  # idempotent: one line per record
    logging.getLogger("gradcouple.models").warning("the cache is damaged; rebuilding it.")
    logging.getLogger("gradcouple.extract").info("resuming 3 shards.")
    logging.getLogger("gradcouple.extract").debug("not shown")
    err = capsys.readouterr().err
    assert err.count("warning: the cache is damaged; rebuilding it.") == 1 and "note: resuming 3 shards." in err
    assert "not shown" not in err


def test_out_of_memory_is_a_resource_error_exit_code(stages, tmp_path):
    stages.extract.raises = MemoryError()
    res = runner.invoke(app, ["extract", "--data", "p.jsonl", "--out", str(tmp_path)])
    assert res.exit_code == 6 and res.output.startswith("error: out of memory; lower --batch-size")


def test_an_interrupted_ripple_names_the_journal_in_its_run_directory(stages, tmp_path):
    stages.ripple.raises = KeyboardInterrupt()
    res = runner.invoke(app, ["ripple", "--run", str(tmp_path / "r")])
    assert res.exit_code == 130
    assert f"every finished edit is kept in {tmp_path / 'r'}/ripple/*/journal-*.jsonl; rerun the same command" in \
        " ".join(res.output.split())
