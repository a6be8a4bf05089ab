"""The command line: help with examples, exit codes, one-line errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gradcouple.cli import app

runner = CliRunner()


@pytest.mark.parametrize("cmd", ["download", "extract", "couple", "ripple", "report", "run"])
def test_help_has_examples(cmd):
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0 and "Examples" in res.output


def test_no_args_shows_help():
    res = runner.invoke(app, [])
    assert "download" in res.output and "couple" in res.output


def test_missing_pieces_file_is_one_line_error(tmp_path):
    res = runner.invoke(app, ["extract", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "nope.jsonl" in res.output and "gradcouple download" in res.output
    assert "Traceback" not in res.output


def test_bad_pieces_line_names_file_line_field(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "dataset": "x", "question_id": "q", "kind": "cloze", "prompt": "The sky is", "answer": "blue"}\n'
                 '{"id": "b", "dataset": "x", "question_id": "q", "kind": "cloze", "prompt": "Grass is", "answer": ""}\n')
    res = runner.invoke(app, ["extract", "--data", str(p), "--model", "llama-tiny-random", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "p.jsonl:2" in res.output and "answer" in res.output


def test_couple_without_extraction(tmp_path):
    res = runner.invoke(app, ["couple", "--run", str(tmp_path)])
    assert res.exit_code == 5 and "gradcouple extract" in res.output


def test_bad_layers_flag(tmp_path):
    from conftest import write_fact_pieces

    write_fact_pieces(tmp_path / "p.jsonl", n=2)
    res = runner.invoke(app, ["extract", "--data", str(tmp_path / "p.jsonl"), "--model", "llama-tiny-random",
                              "--layers", "9-12", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--layers" in res.output


def test_config_file_and_flag_override(tmp_path):
    from conftest import write_fact_pieces

    write_fact_pieces(tmp_path / "p.jsonl", n=4)
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text("model:\n  name: llama-tiny-random\n  layers: last2\nextract:\n  store: dense\n")
    res = runner.invoke(app, ["extract", "--config", str(cfgf), "--data", str(tmp_path / "p.jsonl"),
                              "--layers", "all", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    import json

    saved = json.loads((tmp_path / "r/config.json").read_text())
    assert saved["model"]["layers"] == "all" and saved["extract"]["store"] == "dense"
    assert saved["model"]["name"] == "llama-tiny-random"
    res = runner.invoke(app, ["couple", "--run", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1].endswith("stats.json")


def test_invalid_config_value(tmp_path):
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text("extract:\n  store: sparse\n")
    res = runner.invoke(app, ["extract", "--config", str(cfgf), "--data", "x.jsonl", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "extract.store" in res.output


def test_shipped_configs_are_valid():
    from pathlib import Path

    from gradcouple.config import RunConfig, load_config

    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        load_config(f)
    assert load_config(files[[f.name for f in files].index("default.yaml")]) == RunConfig()


def test_couple_with_model_extracts_first_then_reuses(tmp_path, monkeypatch):
    from conftest import write_fact_pieces

    monkeypatch.chdir(tmp_path)
    write_fact_pieces(tmp_path / "p.jsonl", n=5)
    args = ["couple", "--model", "llama-tiny-random", "--data", "p.jsonl"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "extracting first" in first.output
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("llama-tiny-random-")
    assert (runs[0] / "coupling" / "cosine.pt").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "extracting first" not in again.output


def test_bad_flag_value_names_the_flag(tmp_path):
    res = runner.invoke(app, ["ripple", "--run", str(tmp_path), "--edits", "0"])
    assert res.exit_code == 2 and "--edits 0" in res.output
    res = runner.invoke(app, ["extract", "--data", "x.jsonl", "--store", "bogus", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--store 'bogus'" in res.output


def test_run_without_editable_pieces_still_reports(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "dataset": "x", "question_id": "q", "kind": "cloze", '
                                      '"prompt": "The sky is", "answer": "blue"}\n')
    res = runner.invoke(app, ["run", "--data", str(tmp_path / "p.jsonl"), "--model", "llama-tiny-random",
                              "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "ripple skipped" in res.output and (tmp_path / "r/report/index.html").is_file()
