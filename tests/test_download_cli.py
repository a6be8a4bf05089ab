"""`gradcouple download` through Typer's CliRunner: listing, the bundled sample, the stdout
contract for pipelines, exit codes, and one readable error line per kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradcouple.cli import app
from gradcouple.datasets import SOURCES
from gradcouple.pieces import read_pieces

FIXTURES = Path(__file__).resolve().parent / "fixtures"
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["download", *args])


def oneline(text: str) -> str:
    return " ".join(text.split())


def test_list_shows_every_source():
    res = run("--list")
    assert res.exit_code == 0, res.output
    for name in SOURCES:
        assert f" {name} " in res.stdout
    for text in ("hotpotqa/hotpot_qa", "CC BY-SA 4.0", "2wiki = 2wikimultihopqa", "validation*"):
        assert text in oneline(res.stdout)


def test_sample_writes_pieces_and_prints_the_path_last(tmp_path):
    out = tmp_path / "d"
    res = run("musique", "--sample", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [str(out / "pieces.jsonl")]  # only the path: `| tail -1` works
    summary = oneline(res.stderr)
    for text in ("records read 12", "pieces: single_hop", "pieces: multi_hop", "pieces written", "download.json"):
        assert text in summary
    pieces = read_pieces(out / "pieces.jsonl")
    meta = json.loads((out / "download.json").read_text())
    assert meta["pieces_made"] == len(pieces) and meta["input"]["kind"] == "sample"


def test_default_out_dir_and_sniffed_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run("--from", str(FIXTURES / "plain_pieces.jsonl"))
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(Path("data") / "plain_pieces" / "pieces.jsonl")
    assert "piece skipped 1 answer appears in its own prompt" in oneline(res.stderr)
    res = run("2wiki", "--sample", "--limit", "3")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(Path("data") / "2wikimultihopqa" / "pieces.jsonl")
    assert json.loads((tmp_path / "data" / "2wikimultihopqa" / "download.json").read_text())["records_read"] == 3


def test_help_has_examples():
    res = run("--help")
    assert res.exit_code == 0
    text = oneline(res.output)
    assert "--sample" in text and "--skip-bad" in text and "tail -1" in text


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


GOOD = {"id": "test_1", "question": "What rocket launched Voyager 2?", "golden_answers": ["Titan IIIE"]}


@pytest.mark.parametrize(
    "rows, fmt, expected",
    [
        ([GOOD, '{"id": "test_2", "question": "Q?"'], None, "in.jsonl:2: not valid JSON"),
        ([GOOD, {"id": "test_2", "question": "Q?"}], None, "in.jsonl:2: field 'answer': missing"),
        ([GOOD, {"id": "test_2", "question": "Q?", "golden_answers": [" "]}], None, "in.jsonl:2: field 'golden_answers': empty answer list"),
        ([GOOD, {"id": "test_2", "question": "Q?", "golden_answers": ["A"], "question_decomposition": []}], None,
         "in.jsonl:2: mixed formats: this record looks like musique, but the input is read as bamboogle"),
        ([{"foo": 1}], None, "in.jsonl:1: unknown record format (keys: foo); pass --format"),
        ([GOOD], "csv", "unknown format 'csv'"),
        ([{"prompt": "Capital of France?", "answer": "Paris", "colour": "blue"}], "pieces", "in.jsonl:1: field 'colour': unknown field"),
    ],
    ids=["malformed-json", "missing-field", "empty-answer", "mixed-formats", "unknown-format", "bad-format-flag", "unknown-field"],
)
def test_bad_input_is_one_located_error_line(tmp_path, rows, fmt, expected):
    path = _jsonl(tmp_path / "in.jsonl", rows)
    args = ["--from", path, "--out", str(tmp_path / "o")] + (["--format", fmt] if fmt else [])
    res = run(*args)
    assert res.exit_code == 2, res.output
    err = oneline(res.stderr)
    assert err.startswith("error:") and expected in err
    assert res.stdout == "" and not (tmp_path / "o" / "pieces.jsonl").exists()


def test_skip_bad_reports_the_skips(tmp_path):
    path = _jsonl(tmp_path / "in.jsonl", [GOOD, "{oops", {"id": "x", "question": "Q?"}])
    res = run("bamboogle", "--from", path, "--out", str(tmp_path / "o"), "--skip-bad")
    assert res.exit_code == 0, res.output
    err = oneline(res.stderr)
    assert "record skipped 1 not valid JSON" in err and "record skipped 1 missing: answer" in err
    assert len(read_pieces(res.stdout.strip())) == 1


def test_usage_errors(tmp_path):
    assert run().exit_code == 2  # neither a dataset nor --from
    res = run("nope", "--sample")
    assert res.exit_code == 2 and "unknown dataset 'nope'" in oneline(res.stderr)
    res = run("hotpotqa-fullwiki", "--sample", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "no bundled sample" in oneline(res.stderr)
    res = run("musique", "--sample", "--from", "x.jsonl")
    assert res.exit_code == 2 and "exclude each other" in oneline(res.stderr)
    assert run("musique", "--sample", "--limit", "0").exit_code == 2


def test_offline_exit_code_and_way_out(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run("wikihop", "--out", str(tmp_path / "o"))
    assert res.exit_code == 4, res.output
    err = oneline(res.stderr)
    assert "--from PATH" in err and "gradcouple download wikihop --sample" in err
