"""`gradcouple download` through Typer's CliRunner: listing, the bundled sample, the stdout
contract for pipelines, RippleEdits (bundled sample and native file), exit codes, and one
readable error line per kind of bad input."""

from __future__ import annotations

import json
from collections import Counter
from importlib.resources import files
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradcouple.cli import app
from gradcouple.datasets import SOURCES
from gradcouple.pieces import read_pieces

FIXTURES = Path(__file__).resolve().parent / "fixtures"
runner = CliRunner()
#: exit codes of the command line
OK, BAD_INPUT, NO_NETWORK = 0, 2, 4
RECORDS_PER_SAMPLE = 12


def run(*args: str):
    return runner.invoke(app, ["download", *args])


def oneline(text: str) -> str:
    return " ".join(text.split())


def jsonl(path: Path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- --list and --help


@pytest.fixture(scope="module")
def listing():
    return run("--list")


def test_list_exits_0(listing):
    assert listing.exit_code == OK, listing.output


@pytest.mark.parametrize("name", SOURCES)
def test_list_shows_every_source(listing, name):
    assert f" {name} " in listing.stdout


@pytest.mark.parametrize("text", ["hotpotqa/hotpot_qa", "CC BY-SA 4.0", "2wiki = 2wikimultihopqa", "validation*"],
                         ids=["hub-location", "license", "alias", "default-split"])
def test_list_shows_location_license_aliases_and_default_split(listing, text):
    assert text in oneline(listing.stdout)


@pytest.mark.parametrize("text", ["--sample", "--skip-bad", "tail -1"])
def test_help_shows_the_examples(text):
    assert text in oneline(run("--help").output)


# ----------------------------------------------------------------------------- the bundled sample


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "d"
    return out, run("musique", "--sample", "--out", str(out))


def test_sample_exits_0(sample_run):
    _, res = sample_run
    assert res.exit_code == OK, res.output


def test_sample_prints_only_the_pieces_path_on_stdout(sample_run):
    out, res = sample_run
    assert res.stdout.splitlines() == [str(out / "pieces.jsonl")]  # only the path: `| tail -1` works


@pytest.mark.parametrize("text", [f"records read {RECORDS_PER_SAMPLE}", "pieces: single_hop", "pieces: multi_hop",
                                  "pieces written", "download.json"])
def test_sample_summary_on_stderr_shows(sample_run, text):
    assert text in oneline(sample_run[1].stderr)


def test_sample_download_json_counts_the_pieces_written(sample_run):
    out, _ = sample_run
    assert json.loads((out / "download.json").read_text())["pieces_made"] == len(read_pieces(out / "pieces.jsonl"))


def test_sample_download_json_records_the_sample_as_input(sample_run):
    out, _ = sample_run
    assert json.loads((out / "download.json").read_text())["input"]["kind"] == "sample"


# ----------------------------------------------------------------------------- RippleEdits

RIPPLE_SAMPLE = files("gradcouple") / "datasets" / "sample" / "rippleedits_compositional.sample.jsonl"
RIPPLE_NATIVE = FIXTURES / "rippleedits_native.json"


def roles_and_criteria(pieces_path: Path) -> tuple[dict, dict]:
    """Pieces per role and test pieces per criterion, counted in a pieces.jsonl."""
    pieces = read_pieces(pieces_path)
    return (dict(Counter(p.role.value for p in pieces if p.role)),
            dict(Counter(p.criterion for p in pieces if p.role and p.role.value == "test")))


@pytest.fixture(scope="module")
def ripple_sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ripple") / "d"
    return out, run("rippleedits", "--sample", "--out", str(out))


@pytest.fixture(scope="module")
def ripple_native_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ripple-native") / "d"
    return out, run("--from", str(RIPPLE_NATIVE), "--out", str(out))


def test_rippleedits_sample_exits_0(ripple_sample_run):
    assert ripple_sample_run[1].exit_code == OK, ripple_sample_run[1].output


def test_rippleedits_sample_prints_only_the_pieces_path(ripple_sample_run):
    out, res = ripple_sample_run
    assert res.stdout.splitlines() == [str(out / "pieces.jsonl")]


def test_rippleedits_sample_reads_every_bundled_record(ripple_sample_run):
    out, _ = ripple_sample_run
    lines = [line for line in RIPPLE_SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert json.loads((out / "download.json").read_text())["records_read"] == len(lines)


def test_rippleedits_sample_download_json_counts_the_roles_and_criteria_written(ripple_sample_run):
    out, _ = ripple_sample_run
    meta = json.loads((out / "download.json").read_text())
    assert (meta["pieces_per_role"], meta["pieces_per_criterion"]) == roles_and_criteria(out / "pieces.jsonl")


def test_rippleedits_alias_reads_the_same_sample(tmp_path, ripple_sample_run):
    out, _ = ripple_sample_run
    res = run("ripple-edits", "--sample", "--out", str(tmp_path / "d"))
    assert (tmp_path / "d" / "pieces.jsonl").read_bytes() == (out / "pieces.jsonl").read_bytes(), res.output


def test_rippleedits_native_file_exits_0(ripple_native_run):
    assert ripple_native_run[1].exit_code == OK, ripple_native_run[1].output


def test_rippleedits_native_file_is_sniffed_as_rippleedits(ripple_native_run):
    out, _ = ripple_native_run
    assert json.loads((out / "download.json").read_text())["format"] == "rippleedits"


def test_rippleedits_native_file_download_json_counts_the_roles_and_criteria_written(ripple_native_run):
    out, _ = ripple_native_run
    meta = json.loads((out / "download.json").read_text())
    assert (meta["pieces_per_role"], meta["pieces_per_criterion"]) == roles_and_criteria(out / "pieces.jsonl")


def test_rippleedits_native_file_yields_tests_of_five_criteria(ripple_native_run):
    # the sixth, Forgetfulness, asks "..., which is not United States of America, is" -> United States of America: a leak
    out, _ = ripple_native_run
    assert set(roles_and_criteria(out / "pieces.jsonl")[1]) == {
        "Relation_Specifity", "Logical_Generalization", "Subject_Aliasing", "Compositionality_I", "Compositionality_II"}


def test_rippleedits_native_file_read_as_the_named_dataset_gives_the_same_pieces(tmp_path, ripple_native_run):
    out, _ = ripple_native_run
    run("rippleedits", "--from", str(RIPPLE_NATIVE), "--out", str(tmp_path / "d"))
    assert (tmp_path / "d" / "pieces.jsonl").read_bytes() == (out / "pieces.jsonl").read_bytes()


# ----------------------------------------------------------------------------- defaults


def test_default_out_dir_of_a_file_is_data_slash_its_stem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run("--from", str(FIXTURES / "plain_pieces.jsonl"))
    assert res.stdout.strip() == str(Path("data") / "plain_pieces" / "pieces.jsonl")


def test_summary_shows_skipped_pieces_by_reason(tmp_path):
    res = run("--from", str(FIXTURES / "plain_pieces.jsonl"), "--out", str(tmp_path / "o"))
    assert "piece skipped 1 answer appears in its own prompt" in oneline(res.stderr)


def test_default_out_dir_of_a_dataset_is_data_slash_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run("2wiki", "--sample", "--limit", "3")
    assert res.stdout.strip() == str(Path("data") / "2wikimultihopqa" / "pieces.jsonl")


def test_limit_caps_the_records_read(tmp_path):
    run("2wiki", "--sample", "--limit", "3", "--out", str(tmp_path / "o"))
    assert json.loads((tmp_path / "o" / "download.json").read_text())["records_read"] == 3


# ----------------------------------------------------------------------------- bad input


GOOD = {"id": "test_1", "question": "What rocket launched Voyager 2?", "golden_answers": ["Titan IIIE"]}

BAD_INPUTS = pytest.mark.parametrize(
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


def run_bad(tmp_path: Path, rows: list, fmt):
    path = jsonl(tmp_path / "in.jsonl", rows)
    return run("--from", path, "--out", str(tmp_path / "o"), *(["--format", fmt] if fmt else []))


@BAD_INPUTS
def test_bad_input_exits_2(tmp_path, rows, fmt, expected):
    res = run_bad(tmp_path, rows, fmt)
    assert res.exit_code == BAD_INPUT, res.output


@BAD_INPUTS
def test_bad_input_is_one_located_error_line(tmp_path, rows, fmt, expected):
    err = oneline(run_bad(tmp_path, rows, fmt).stderr)
    assert err.startswith("error:") and expected in err


@BAD_INPUTS
def test_bad_input_prints_nothing_on_stdout(tmp_path, rows, fmt, expected):
    assert run_bad(tmp_path, rows, fmt).stdout == ""


@BAD_INPUTS
def test_bad_input_writes_no_pieces(tmp_path, rows, fmt, expected):
    run_bad(tmp_path, rows, fmt)
    assert not (tmp_path / "o" / "pieces.jsonl").exists()


@pytest.fixture
def skip_bad_run(tmp_path):
    path = jsonl(tmp_path / "in.jsonl", [GOOD, "{oops", {"id": "x", "question": "Q?"}])
    return run("bamboogle", "--from", path, "--out", str(tmp_path / "o"), "--skip-bad")


def test_skip_bad_exits_0(skip_bad_run):
    assert skip_bad_run.exit_code == OK, skip_bad_run.output


@pytest.mark.parametrize("line", ["record skipped 1 not valid JSON", "record skipped 1 missing: answer"])
def test_skip_bad_summary_lists_each_skipped_record_by_reason(skip_bad_run, line):
    assert line in oneline(skip_bad_run.stderr)


def test_skip_bad_writes_the_good_record(skip_bad_run):
    assert [p.question_id for p in read_pieces(skip_bad_run.stdout.strip())] == [GOOD["id"]]


# ----------------------------------------------------------------------------- usage errors


def test_neither_dataset_nor_file_is_a_usage_error():
    assert run().exit_code == BAD_INPUT


def test_unknown_dataset_error_names_it():
    assert "error: unknown dataset 'nope'" in oneline(run("nope", "--sample").stderr)


def test_dataset_without_a_sample_error_says_so(tmp_path):
    assert "no bundled sample" in oneline(run("hotpotqa-fullwiki", "--sample", "--out", str(tmp_path / "o")).stderr)


def test_sample_and_from_exclude_each_other():
    assert "exclude each other" in oneline(run("musique", "--sample", "--from", "x.jsonl").stderr)


def test_limit_below_one_is_a_usage_error():
    assert run("musique", "--sample", "--limit", "0").exit_code == BAD_INPUT


# ----------------------------------------------------------------------------- offline


@pytest.fixture
def offline_run(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return run("wikihop", "--out", str(tmp_path / "o"))


def test_offline_download_exits_4(offline_run):
    assert offline_run.exit_code == NO_NETWORK, offline_run.output


@pytest.mark.parametrize("way_out", ["--from PATH", "gradcouple download wikihop --sample"])
def test_offline_error_names_the_ways_out(offline_run, way_out):
    assert way_out in oneline(offline_run.stderr)
