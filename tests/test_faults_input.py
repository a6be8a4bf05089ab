"""Input files that are not UTF-8, through the command line: a pieces file (extract, couple, run),
a dataset file (download: JSONL, JSON array, parquet), and a config file. Each is one error line
naming the file, the byte offset and the fix, and leaves no output behind; ``download --skip-bad``
skips and counts undecodable JSONL lines and parquet records. Also: the split that download.json
records is the one actually read (the bundled sample's own; none for a file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradcouple.cli.app import app
from gradcouple.pieces import read_pieces

runner = CliRunner()
OK, BAD_INPUT = 0, 2


def piece(i: int, answer: str = "Bob") -> dict:
    return {"id": f"x:{i}:0", "dataset": "x", "question_id": str(i), "kind": "single_hop", "prompt": f"Who is {i}?", "answer": answer}


def write_lines(path: Path, rows: list) -> Path:
    """JSONL where a ``bytes`` row is written as is and any other row as UTF-8 JSON."""
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def latin1(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("latin-1")


def error_line(res) -> str:
    """The one line a failed command printed (stderr), checked to be exactly one ``error:`` line."""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# ----------------------------------------------------------------------------- pieces files

GOOD_PIECES = [piece(i) for i in range(6)]
BAD_PIECE = latin1(piece(9, "Jos\u00e9"))  # 0xe9 inside a JSON string


@pytest.fixture
def bad_pieces(tmp_path) -> Path:
    return write_lines(tmp_path / "bad_pieces.jsonl", [*GOOD_PIECES, BAD_PIECE])


def expected_offset(path: Path) -> int:
    """Byte offset of the first non-ASCII byte: where decoding these Latin-1 files fails."""
    return next(i for i, b in enumerate(path.read_bytes()) if b > 0x7F)


@pytest.mark.parametrize("command", [
    ["extract", "--data", "{data}", "--out", "{out}"],
    ["couple", "--model", "gpt2-tiny-random", "--data", "{data}"],
    ["run", "--data", "{data}", "--out", "{out}", "--model", "gpt2-tiny-random"],
], ids=["extract", "couple", "run"])
def test_pieces_file_not_utf8_is_one_line_with_byte_and_line(bad_pieces, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)  # couple --model makes runs/<model>-<hash> in the working directory
    out = tmp_path / "run"
    res = runner.invoke(app, [a.format(data=bad_pieces, out=out) for a in command])
    assert res.exit_code == BAD_INPUT
    line = error_line(res)
    assert f"{bad_pieces}: not UTF-8 at byte {expected_offset(bad_pieces)} (line 7: byte 0xe9, invalid continuation byte)" in line
    assert "iconv -f latin1 -t utf-8" in line and "--skip-bad" not in line  # these commands have no --skip-bad
    assert files_under(out) == [] and files_under(tmp_path / "runs") == []
    assert not out.exists() and not (tmp_path / "runs").exists()  # no empty run directory left behind


def test_pieces_file_with_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(piece(0)).encode() + b"\n")
    assert [p.id for p in read_pieces(path)] == ["x:0:0"]


# ----------------------------------------------------------------------------- download

FACTS = [{"prompt": "Who wrote X?", "answer": "Ann"}, {"prompt": "Who made Z?", "answer": "Tom"}]
BAD_FACT = latin1({"prompt": "What is the capital of Y?", "answer": "S\u00e3o Jos\u00e9"})


def download(*args: str):
    return runner.invoke(app, ["download", "--format", "pieces", *args])


def test_download_jsonl_not_utf8_is_one_line_naming_byte_line_and_skip_bad(tmp_path):
    path = write_lines(tmp_path / "facts.jsonl", [FACTS[0], BAD_FACT, FACTS[1]])
    res = download("--from", str(path), "--out", str(tmp_path / "o"))
    assert res.exit_code == BAD_INPUT
    line = error_line(res)
    assert f"{path}: not UTF-8 at byte {expected_offset(path)} (line 2: byte 0xe3, invalid continuation byte)" in line
    assert "iconv -f latin1 -t utf-8" in line and "--skip-bad" in line
    assert not (tmp_path / "o").exists() and res.stdout == ""


def test_download_failure_leaves_an_earlier_output_unchanged(tmp_path):
    good = write_lines(tmp_path / "good.jsonl", FACTS)
    out = tmp_path / "o"
    assert download("--from", str(good), "--out", str(out)).exit_code == OK
    before = {p.name: p.read_bytes() for p in files_under(out)}
    bad = write_lines(tmp_path / "facts.jsonl", [FACTS[0], BAD_FACT])
    res = download("--from", str(bad), "--out", str(out))
    assert res.exit_code == BAD_INPUT and "byte" in error_line(res)
    assert {p.name: p.read_bytes() for p in files_under(out)} == before


def test_download_skip_bad_counts_undecodable_lines_with_the_other_skipped_records(tmp_path):
    path = write_lines(tmp_path / "facts.jsonl", [FACTS[0], BAD_FACT, b"{oops", FACTS[1]])
    out = tmp_path / "o"
    res = download("--from", str(path), "--out", str(out), "--skip-bad")
    assert res.exit_code == OK, res.output
    meta = json.loads((out / "download.json").read_text(encoding="utf-8"))
    assert meta["records_skipped"] == {"not UTF-8": 1, "not valid JSON": 1}
    assert (meta["records_read"], meta["records_used"], meta["pieces_made"]) == (4, 2, 2)


def test_download_json_array_not_utf8_is_an_error_even_with_skip_bad(tmp_path):
    path = tmp_path / "facts.json"
    path.write_bytes(b"[" + json.dumps(FACTS[0]).encode() + b",\n" + BAD_FACT + b"]")
    res = download("--from", str(path), "--out", str(tmp_path / "o"), "--skip-bad")
    assert res.exit_code == BAD_INPUT
    line = error_line(res)
    assert f"{path}: not UTF-8 at byte {expected_offset(path)} (line 2: byte 0xe3, invalid continuation byte)" in line
    assert "iconv" in line and "cannot be skipped record by record" in line
    assert not (tmp_path / "o").exists()


def test_download_utf16_jsonl_is_an_error_even_with_skip_bad(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_bytes("\n".join(json.dumps(f) for f in FACTS).encode("utf-16"))
    res = download("--from", str(path), "--out", str(tmp_path / "o"), "--skip-bad")
    assert res.exit_code == BAD_INPUT
    line = error_line(res)
    assert f"{path}: not UTF-8 at byte 0" in line and "iconv -f utf-16 -t utf-8" in line
    assert not (tmp_path / "o").exists()


def test_download_json_with_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "facts.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(FACTS).encode())
    assert download("--from", str(path), "--out", str(tmp_path / "o")).exit_code == OK


@pytest.fixture
def bad_parquet(tmp_path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Parquet strings must be UTF-8, but a writer may not check: view raw bytes as strings.
    answers = pa.array([b"Ann", "S\u00e3o Jos\u00e9".encode("latin-1"), b"Tom"], type=pa.binary()).view(pa.string())
    path = tmp_path / "facts.parquet"
    pq.write_table(pa.table({"prompt": ["Who wrote X?", "What is the capital of Y?", "Who made Z?"], "answer": answers}), path)
    return path


def test_download_parquet_string_not_utf8_names_record_column_and_byte(tmp_path, bad_parquet):
    res = download("--from", str(bad_parquet), "--out", str(tmp_path / "o"))
    assert res.exit_code == BAD_INPUT
    line = error_line(res)
    assert f"{bad_parquet} record 2: not UTF-8: a string in column 'answer' (at byte 1 of the value: byte 0xe3" in line
    assert "--skip-bad" in line and not (tmp_path / "o").exists()


def test_download_parquet_skip_bad_counts_the_record(tmp_path, bad_parquet):
    res = download("--from", str(bad_parquet), "--out", str(tmp_path / "o"), "--skip-bad")
    assert res.exit_code == OK, res.output
    meta = json.loads((tmp_path / "o" / "download.json").read_text(encoding="utf-8"))
    assert (meta["records_skipped"], meta["records_used"]) == ({"not UTF-8": 1}, 2)


def test_download_dataset_directory_skip_bad_skips_each_undecodable_record(tmp_path):
    # The datasets library does not check strings either; records 1, 4, 7 and the last one are Latin-1.
    rows = [latin1({"prompt": f"Who is {i}?", "answer": "Jos\u00e9"}) if i % 3 == 0 else {"prompt": f"Who is {i}?", "answer": "Bob"}
            for i in range(10)]
    write_lines((tmp_path / "dir").mkdir() or tmp_path / "dir" / "facts.jsonl", rows)
    res = download("--from", str(tmp_path / "dir"), "--out", str(tmp_path / "o"))
    assert res.exit_code == BAD_INPUT and "record 1: not UTF-8: a string in column 'answer' (at byte 3" in res.stderr
    res = download("--from", str(tmp_path / "dir"), "--out", str(tmp_path / "o"), "--skip-bad")
    assert res.exit_code == OK, res.output
    meta = json.loads((tmp_path / "o" / "download.json").read_text(encoding="utf-8"))
    assert (meta["records_read"], meta["records_used"], meta["records_skipped"]) == (10, 6, {"not UTF-8": 4})


# ----------------------------------------------------------------------------- config files


def test_config_not_utf8_is_a_config_error_naming_byte_and_line(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes("model:\n  name: gpt2-tiny-random\n# caf\u00e9\n".encode("latin-1"))
    data = write_lines(tmp_path / "pieces.jsonl", GOOD_PIECES)
    out = tmp_path / "run"
    res = runner.invoke(app, ["extract", "--config", str(cfg), "--data", str(data), "--out", str(out)])
    assert res.exit_code == BAD_INPUT  # ConfigError
    line = error_line(res)
    assert f"{cfg}: not UTF-8 at byte {expected_offset(cfg)} (line 3: byte 0xe9, invalid continuation byte)" in line
    assert "iconv -f latin1 -t utf-8" in line and "--skip-bad" not in line
    assert files_under(out) == []


# ----------------------------------------------------------------------------- the split recorded


@pytest.mark.parametrize("name, split", [("musique", "validation"), ("mquake-hard", "all"), ("rippleedits", "popular"),
                                         ("bamboogle", "test")])
def test_sample_records_the_split_it_was_taken_from(tmp_path, name, split):
    res = runner.invoke(app, ["download", name, "--sample", "--out", str(tmp_path / "o")])
    assert res.exit_code == OK, res.output
    meta = json.loads((tmp_path / "o" / "download.json").read_text(encoding="utf-8"))
    assert (meta["split"], meta["input"]["kind"]) == (split, "sample")


def test_sample_with_its_own_split_is_accepted(tmp_path):
    res = runner.invoke(app, ["download", "musique", "--sample", "--split", "validation", "--out", str(tmp_path / "o")])
    assert res.exit_code == OK, res.output


def test_sample_with_another_split_is_refused(tmp_path):
    res = runner.invoke(app, ["download", "musique", "--sample", "--split", "train", "--out", str(tmp_path / "o")])
    assert res.exit_code == BAD_INPUT
    line = error_line(res)
    assert "--split train" in line and "musique_ans_dev.sample.jsonl holds validation-split records only" in line
    assert not (tmp_path / "o").exists()


def test_file_records_no_split_and_refuses_one(tmp_path):
    path = write_lines(tmp_path / "facts.jsonl", FACTS)
    assert download("--from", str(path), "--out", str(tmp_path / "o")).exit_code == OK
    assert json.loads((tmp_path / "o" / "download.json").read_text(encoding="utf-8"))["split"] is None
    res = download("--from", str(path), "--split", "train", "--out", str(tmp_path / "o2"))
    assert res.exit_code == BAD_INPUT and "is a file, read whole" in error_line(res)
    assert not (tmp_path / "o2").exists()
