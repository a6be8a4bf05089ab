"""What a stage records about how it ran: the layers actually selected, prompts cut to
max_length, the thread count, and a note when the machine was busier than its cores."""

from __future__ import annotations

from conftest import write_fact_pieces
from typer.testing import CliRunner

from gradcouple.artifacts import DeviceInfo
from gradcouple.cli.app import app
from gradcouple.scoring import encode_pieces
from gradcouple.models import load_model
from gradcouple.pieces import DEFAULT_PROMPT_TEMPLATE
from gradcouple.rundir import RunDir
from gradcouple.runinfo import overloaded

runner = CliRunner()


def test_extract_records_cut_prompts_threads_and_the_layers_selected(tmp_path):
    pieces = write_fact_pieces(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    full = encode_pieces(load_model("llama-tiny-random").tokenizer, pieces, DEFAULT_PROMPT_TEMPLATE, 10_000)
    limit = max(e.n_answer_tokens for e in full) + 8  # every answer fits, the longer prompts do not
    cuts = [max(0, len(e.ids) - limit) for e in full]
    res = runner.invoke(app, ["extract", "--data", str(tmp_path / "p.jsonl"), "--model", "llama-tiny-random",
                              "--layers", "last2", "--max-length", str(limit), "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    man = RunDir(out).gradients.load_manifest()
    assert [p.truncated_tokens for p in man.pieces] == cuts and sum(cuts) > 0
    n, most, total = man.truncation()
    assert (n, most, total) == (sum(c > 0 for c in cuts), max(cuts), sum(cuts))
    flat = " ".join(res.output.split())
    assert f"{n} of {len(pieces)} prompts were cut from the left to --max-length {limit} tokens (by up to {most}, {total} in all)" in flat
    assert man.timing.device.threads == 1 and "1 threads" in flat
    assert len(man.names) == 2 and all(name in flat for name in man.names)


def test_no_truncation_warning_when_every_prompt_fits(tmp_path):
    write_fact_pieces(tmp_path / "p.jsonl")
    res = runner.invoke(app, ["extract", "--data", str(tmp_path / "p.jsonl"), "--model", "llama-tiny-random",
                              "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert RunDir(tmp_path / "run").gradients.load_manifest().truncation() == (0, 0, 0) and "were cut" not in res.output


def test_a_load_above_the_cores_gets_a_note_naming_threads():
    busy = DeviceInfo(device="cpu", threads=2, cpu_count=2, load_average=6.1)
    assert "load (6.1) exceeded its 2 cores" in overloaded(busy) and "--threads" in overloaded(busy)
    assert overloaded(busy.model_copy(update={"load_average": 1.9})) is None
    assert overloaded(busy.model_copy(update={"load_average": None})) is None

