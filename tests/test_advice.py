"""Messages that give advice: the command an error names works as printed (the test runs it), and a
wrong input is named for what it is (the format it looks like, a directory that is not a model, a
module that is not a linear layer, a facts file that is not yet a pieces file)."""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import write_fact_pieces
from typer.testing import CliRunner

from gradcouple.cli.app import app
from gradcouple.datasets import sample_path
from gradcouple.rundir import RunDir
from gradcouple.stores import shards

runner = CliRunner()
TINY = "llama-tiny-random"


def error(args: list[str], code: int) -> str:
    """Run ``args``: it must exit ``code`` with one ``error:`` line, returned without its prefix."""
    res = runner.invoke(app, args)
    lines = res.output.strip().splitlines()
    assert res.exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0].removeprefix("error: ")


def advised(message: str, **fill: str) -> list[str]:
    """The arguments of the first `gradcouple ...` command a message names, placeholders filled in."""
    command = re.search(r"`gradcouple ([^`]+)`", message).group(1)
    for placeholder, value in fill.items():
        command = command.replace(placeholder, value)
    return shlex.split(command)


def test_an_interrupted_extraction_resumes_with_the_command_couple_names(tmp_path, monkeypatch):
    write_fact_pieces(tmp_path / "p.jsonl")
    run = tmp_path / "run"
    write, written = shards.ShardWriter.write, []

    def interrupted(self, path, taken):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        return write(self, path, taken)

    monkeypatch.setattr(shards.ShardWriter, "write", interrupted)
    res = runner.invoke(app, ["extract", "--data", str(tmp_path / "p.jsonl"), "--out", str(run), "--model", TINY,
                              "--shard-size", "3"])
    assert res.exit_code == 130, res.output
    monkeypatch.undo()
    message = error(["couple", "--run", str(run)], 5)
    assert "the extraction is incomplete (2 shards, 6 of 10 pieces)" in message
    assert advised(message) == ["extract", "--out", str(run)]
    res = runner.invoke(app, advised(message))  # no --data, no --model: the run holds its pieces and settings
    assert res.exit_code == 0, res.output
    assert "2 resumed" in " ".join(res.output.split())
    man = RunDir(run).gradients.load_manifest()
    assert man.complete and man.model.name == TINY and len(man.shards) == 4
    assert runner.invoke(app, ["couple", "--run", str(run)]).exit_code == 0


def test_a_file_of_another_format_is_named_for_what_it_looks_like(tmp_path):
    musique = sample_path("musique")
    message = error(["download", "hotpotqa", "--from", str(musique), "--out", str(tmp_path / "d")], 2)
    assert message.startswith(f"{musique}:1: this record looks like musique, not hotpotqa, so every record would be "
                              f"rejected (--skip-bad would skip them all)")
    res = runner.invoke(app, advised(message, DIR=str(tmp_path / "d")))
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(tmp_path / "d" / "pieces.jsonl")


def test_a_hand_written_facts_file_is_told_how_to_become_a_pieces_file(tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"id": "a", "question_id": "q", "kind": "cloze", "prompt": "The sky is", "answer": "blue"}\n'
                     '{"id": "b", "question_id": "q", "kind": "cloze", "prompt": "Grass is", "answer": "green"}\n')
    message = error(["extract", "--data", str(facts), "--out", str(tmp_path / "run"), "--model", TINY], 2)
    assert message.startswith(f"{facts}:1: field 'dataset': Field required. This looks like a hand-written file of facts")
    assert runner.invoke(app, advised(message, DIR=str(tmp_path / "conv"))).exit_code == 0
    res = runner.invoke(app, ["extract", "--data", str(tmp_path / "conv" / "pieces.jsonl"), "--out", str(tmp_path / "run"),
                              "--model", TINY])
    assert res.exit_code == 0, res.output


def test_a_directory_that_is_not_a_model_is_one_line(tmp_path):
    write_fact_pieces(tmp_path / "p.jsonl")
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "notes.txt").write_text("weights elsewhere")
    message = error(["extract", "--data", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "run"),
                     "--model", str(tmp_path / "notamodel")], 3)
    assert f"{tmp_path / 'notamodel'} is a directory but not a model (no config.json in it)" in message


@pytest.mark.parametrize("model, module, linear", [
    ("gpt2-tiny-random", "ln_2", "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"),
    ("llama-tiny-random", "input_layernorm", "self_attn.q_proj"),
])
def test_a_module_that_is_not_a_linear_layer_is_a_bad_option_naming_the_linear_ones(tmp_path, model, module, linear):
    write_fact_pieces(tmp_path / "p.jsonl")
    message = error(["extract", "--data", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "run"), "--model", model,
                     "--module", module], 2)
    assert message.startswith(f"--module {module}: block ") and "not a linear layer; its linear layers are " in message
    assert linear in message
