"""gradcouple.datasets, specified on the real samples bundled with the package (12 records per
dataset) and on schema-faithful fixtures: the registry, every format's pieces (expected values
read from the input records, not from the parsers), download.json, the Hub path through local
dataset directories, and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import defaultdict
from importlib.resources import files
from pathlib import Path

import pytest

import gradcouple
from gradcouple.datasets import (
    ALIASES,
    FORMATS,
    RELATION_TEMPLATES,
    SOURCES,
    DownloadMeta,
    download,
    list_sources,
    relation_question,
    resolve_source,
    sample_files,
    sample_path,
    sniff_format,
)
from gradcouple.errors import DataError, NetworkError
from gradcouple.pieces import read_pieces

FIXTURES = Path(__file__).resolve().parent / "fixtures"

#: test name -> bundled sample file
FILES = {
    "hotpotqa": "hotpotqa_dev_distractor.sample.jsonl",
    "musique": "musique_ans_dev.sample.jsonl",
    "musique-flashrag": "musique_dev.flashrag.sample.jsonl",
    "2wikimultihopqa": "2wikimultihopqa_dev.sample.jsonl",
    "wikihop": "wikihop_dev.sample.jsonl",
    "bamboogle": "bamboogle_test.sample.jsonl",
    "mquake": "mquake_hard.sample.jsonl",
}
#: test name -> the format its records are in
FORMAT_OF = {name: "musique" if name == "musique-flashrag" else name for name in FILES}
RECORDS_PER_SAMPLE = 12
#: Network failures must surface within this many seconds, not after a library's retries.
FAIL_FAST_S = 10.0
# Reasons a piece may be left out, all by design; anything else is an unexplained skip.
KNOWN_PIECE_SKIPS = {
    "answer appears in its own prompt",
    "supporting sentence mentions neither the answer nor the bridge entity",
    "yes/no answer: no answer span in the supporting sentence",
    "mention opens the sentence (empty cloze prefix)",
    "mention glued to the preceding word",
    "cloze prefix shorter than 3 words",
    "supporting fact names a paragraph missing from the context",
    "supporting fact points past the paragraph's last sentence",
}
#: The keys of download.json, in file order.
META_KEYS = [
    "source", "format", "dataset", "input", "split", "revision", "limit", "skip_bad",
    "records_read", "records_used", "records_skipped", "pieces_made", "pieces_per_kind",
    "pieces_merged_as_duplicates", "counterfactual_conflicts_first_kept", "pieces_skipped",
    "leak_rule", "package_version",
]


def records(name: str) -> list[dict]:
    text = sample_path(FILES[name]).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def squash(text: str) -> str:
    return " ".join(text.split())


def mentioned(answer: str, prompt: str) -> bool:
    """Independent leak check: the answer as a whole word, case-insensitively."""
    return re.search(rf"(?<!\w){re.escape(answer.casefold())}(?!\w)", prompt.casefold()) is not None


def question_and_answer(name: str, record: dict) -> tuple[str, str]:
    """The multi-hop question of a record and its gold answer, as the dataset stores them."""
    question = record["questions"][0] if name == "mquake" else record["question"]
    answer = record["golden_answers"][0] if "golden_answers" in record else record["answer"]
    return squash(question), squash(answer)


def decomposition(record: dict) -> list[dict]:
    return record.get("question_decomposition") or record["metadata"]["question_decomposition"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """Each bundled sample converted once, read through ``from_path="sample:FILE"``."""
    return {name: download(FORMAT_OF[name], tmp_path_factory.mktemp(name), from_path=f"sample:{fname}")
            for name, fname in FILES.items()}


# ----------------------------------------------------------------------------- registry


def test_registry_holds_every_documented_source():
    assert {"hotpotqa", "hotpotqa-fullwiki", "musique", "2wikimultihopqa", "wikihop", "bamboogle", "mquake",
            "mquake-cf-3k", "mquake-cf-3k-v2", "mquake-t", "pieces"} <= set(SOURCES)


@pytest.mark.parametrize("alias, name", [("hotpotqa-distractor", "hotpotqa"), ("2WIKI", "2wikimultihopqa"), (" Musique ", "musique")])
def test_source_lookup_accepts_aliases_in_any_case(alias, name):
    assert resolve_source(alias).name == name


def test_every_alias_resolves_to_its_source():
    assert {a: resolve_source(a).name for a in ALIASES} == ALIASES


def test_list_has_one_row_per_source_in_registry_order():
    assert [r["name"] for r in list_sources()] == list(SOURCES)


def test_list_rows_carry_the_columns_of_download_list():
    assert all({"name", "hub", "hub_file", "splits", "default_split", "license", "size", "sample"} <= set(r) for r in list_sources())


def test_every_downloadable_source_defaults_to_one_of_its_splits():
    assert [r["name"] for r in list_sources() if r["name"] != "pieces" and r["default_split"] not in r["splits"]] == []


def test_every_downloadable_source_names_its_license_and_location():
    assert [r["name"] for r in list_sources() if r["name"] != "pieces" and not (r["license"] and r["hub"])] == []


def test_hotpotqa_settings_are_hub_configs():
    assert (SOURCES["hotpotqa"].hub_config, SOURCES["hotpotqa-fullwiki"].hub_config) == ("distractor", "fullwiki")


def test_unknown_dataset_error_lists_the_known_ones():
    with pytest.raises(DataError, match="unknown dataset 'nope'.*musique"):
        resolve_source("nope")


def test_formats_are_the_parsers():
    assert set(FORMATS) == {"hotpotqa", "musique", "2wikimultihopqa", "wikihop", "bamboogle", "mquake", "pieces"}


# ----------------------------------------------------------------------------- bundled samples


def test_sample_path_accepts_an_alias():
    assert sample_path("2wiki").name == "2wikimultihopqa_dev.sample.jsonl"


def test_source_without_a_sample_has_no_sample_path():
    with pytest.raises(DataError, match="no bundled sample"):
        sample_path("hotpotqa-fullwiki")


def test_sample_files_lists_every_bundled_sample():
    assert sorted(FILES.values()) == sample_files()


@pytest.mark.parametrize("fname", FILES.values())
def test_every_bundled_sample_is_credited_in_notice(fname):
    assert fname in (files("gradcouple") / "NOTICE").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", FILES)
def test_every_bundled_sample_holds_12_records(name):
    assert len(records(name)) == RECORDS_PER_SAMPLE


def test_sample_download_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download("musique", tmp_path, from_path="sample").meta.records_read == len(records("musique"))


def test_sample_download_records_sample_as_its_input_kind(tmp_path):
    assert download("musique", tmp_path, from_path="sample").meta.input["kind"] == "sample"


def test_sample_colon_file_reads_that_bundled_file(tmp_path):
    bundled = files("gradcouple") / "datasets" / "sample" / FILES["musique-flashrag"]
    res = download("musique", tmp_path, from_path=f"sample:{FILES['musique-flashrag']}")
    assert res.meta.input["sha256"] == hashlib.sha256(bundled.read_bytes()).hexdigest()


def test_limit_reads_at_most_that_many_records(tmp_path):
    assert download("2wiki", tmp_path, from_path="sample", limit=3).meta.records_read == 3


# ----------------------------------------------------------------------------- every bundled sample


@pytest.mark.parametrize("name", FILES)
def test_sample_reads_every_record(converted, name):
    assert converted[name].meta.records_read == len(records(name))


@pytest.mark.parametrize("name", FILES)
def test_sample_uses_every_record(converted, name):
    assert (converted[name].meta.records_used, converted[name].meta.records_skipped) == (len(records(name)), {})


@pytest.mark.parametrize("name", FILES)
def test_pieces_are_skipped_only_for_known_reasons(converted, name):
    assert set(converted[name].meta.pieces_skipped) <= KNOWN_PIECE_SKIPS


@pytest.mark.parametrize("name", FILES)
def test_pieces_file_reads_back_as_the_returned_pieces(converted, name):
    assert read_pieces(converted[name].pieces_path) == converted[name].pieces


@pytest.mark.parametrize("name", FILES)
def test_download_json_has_the_documented_keys_in_order(converted, name):
    assert list(json.loads(converted[name].meta_path.read_text(encoding="utf-8"))) == META_KEYS


@pytest.mark.parametrize("name", FILES)
def test_download_json_reads_back_as_the_returned_meta(converted, name):
    assert DownloadMeta.model_validate_json(converted[name].meta_path.read_text(encoding="utf-8")) == converted[name].meta


@pytest.mark.parametrize("name", FILES)
def test_download_json_records_the_checksum_of_the_input(converted, name):
    assert converted[name].meta.input["sha256"] == hashlib.sha256(sample_path(FILES[name]).read_bytes()).hexdigest()


def test_download_json_records_the_package_version(converted):
    assert converted["musique"].meta.package_version == gradcouple.__version__


@pytest.mark.parametrize("name", FILES)
def test_pieces_made_counts_the_lines_of_pieces_jsonl(converted, name):
    lines = [line for line in converted[name].pieces_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert converted[name].meta.pieces_made == len(lines)


@pytest.mark.parametrize("name", FILES)
def test_no_two_pieces_share_prompt_and_answer(converted, name):
    pieces = converted[name].pieces
    assert len({(p.prompt, p.answer) for p in pieces}) == len(pieces)


@pytest.mark.parametrize("name", FILES)
def test_no_piece_mentions_its_answer_in_its_prompt(converted, name):
    assert [p.id for p in converted[name].pieces if mentioned(p.answer, p.prompt)] == []


@pytest.mark.parametrize("name", FILES)
def test_no_prompt_keeps_a_step_reference_or_arrow(converted, name):
    assert [p.id for p in converted[name].pieces if re.search(r"#\d", p.prompt) or ">>" in p.prompt] == []


@pytest.mark.parametrize("name", FILES)
def test_prompts_and_answers_have_no_stray_whitespace(converted, name):
    assert [p.id for p in converted[name].pieces if squash(p.prompt) != p.prompt or squash(p.answer) != p.answer] == []


@pytest.mark.parametrize("name", FILES)
def test_first_owner_is_the_question_id(converted, name):
    assert [p.id for p in converted[name].pieces if p.owners[0] != p.question_id] == []


@pytest.mark.parametrize("name", FILES)
def test_piece_id_starts_with_dataset_and_record_id(converted, name):
    record_ids = {f"{FORMAT_OF[name]}:{r.get('_id', r.get('id', r.get('case_id')))}" for r in records(name)}
    assert {p.id.rsplit(":", 1)[0] for p in converted[name].pieces} <= record_ids


@pytest.mark.parametrize("name", FILES)
def test_question_id_is_the_record_part_of_the_piece_id(converted, name):
    assert [p.id for p in converted[name].pieces if p.id.split(":")[1] != p.question_id] == []


@pytest.mark.parametrize("name", FILES)
def test_question_piece_id_ends_with_q(converted, name):
    assert [p.id for p in converted[name].pieces if p.kind.value == "multi_hop" and not p.id.endswith(":q")] == []


@pytest.mark.parametrize("name", FILES)
def test_other_piece_ids_end_with_their_hop(converted, name):
    assert [p.id for p in converted[name].pieces if p.kind.value != "multi_hop" and p.id.rsplit(":", 1)[1] != str(p.hop)] == []


@pytest.mark.parametrize("name", FILES)
def test_exactly_the_multi_hop_pieces_have_no_hop(converted, name):
    assert [p.id for p in converted[name].pieces if (p.hop is None) != (p.kind.value == "multi_hop")] == []


@pytest.mark.parametrize("name", FILES)
def test_first_record_sniffs_as_its_format(name):
    assert sniff_format(records(name)[0]) == FORMAT_OF[name]


@pytest.mark.parametrize("name", [n for n in FILES if n != "wikihop"])
def test_each_question_not_giving_away_its_answer_is_a_multi_hop_piece(converted, name):
    expected = {question_and_answer(name, r) for r in records(name)}
    expected = {(q, a) for q, a in expected if not mentioned(a, q)}
    assert {(p.prompt, p.answer) for p in converted[name].pieces if p.kind.value == "multi_hop"} == expected


@pytest.mark.parametrize("name", [n for n in FILES if n != "wikihop"])
def test_pieces_per_kind_counts_the_multi_hop_questions(converted, name):
    questions = {question_and_answer(name, r) for r in records(name)}
    assert converted[name].meta.pieces_per_kind.get("multi_hop", 0) == sum(not mentioned(a, q) for q, a in questions)


@pytest.mark.parametrize("name", FILES)
def test_pieces_per_kind_adds_up_to_pieces_made(converted, name):
    assert sum(converted[name].meta.pieces_per_kind.values()) == converted[name].meta.pieces_made


@pytest.mark.parametrize("name", ["hotpotqa", "mquake", "musique"])
def test_piece_ids_do_not_depend_on_naming_the_source(tmp_path, name):
    named = download(name, tmp_path / "a", from_path=sample_path(FILES[name]))
    by_format = download(None, tmp_path / "b", from_path=sample_path(FILES[name]), format=name)
    assert named.pieces_path.read_bytes() == by_format.pieces_path.read_bytes()


# ----------------------------------------------------------------------------- MuSiQue


@pytest.mark.parametrize("name", ["musique", "musique-flashrag"])
def test_musique_every_step_is_a_piece_or_merged_into_one(converted, name):
    meta = converted[name].meta
    n_steps = sum(len(decomposition(r)) for r in records(name))
    assert meta.pieces_per_kind["single_hop"] + meta.pieces_merged_as_duplicates.get("single_hop", 0) == n_steps


@pytest.mark.parametrize("name", ["musique", "musique-flashrag"])
def test_musique_step_pieces_answer_with_the_step_answer(converted, name):
    owned = {(q, p.answer) for p in converted[name].pieces if p.kind.value == "single_hop" for q in p.owners}
    steps = {(r["id"], s["answer"].strip()) for r in records(name) for s in decomposition(r)}
    assert steps <= owned


@pytest.mark.parametrize("name", ["musique", "musique-flashrag"])
def test_musique_step_reference_is_replaced_by_the_earlier_answer(converted, name):
    by_id = {p.id: p for p in converted[name].pieces}
    refs = [(r["id"], k, decomposition(r)[int(j) - 1]["answer"].strip())
            for r in records(name) for k, s in enumerate(decomposition(r)) for j in re.findall(r"#(\d+)", s["question"])]
    assert refs, "the sample has steps that refer to earlier ones"
    assert [(rid, k) for rid, k, earlier in refs if f"musique:{rid}:{k}" in by_id and earlier not in by_id[f"musique:{rid}:{k}"].prompt] == []


@pytest.mark.parametrize("name", ["musique", "musique-flashrag"])
def test_musique_relation_step_carries_its_triple(converted, name):
    by_id = {p.id: p for p in converted[name].pieces}
    steps = [(f"musique:{r['id']}:{k}", s) for r in records(name) for k, s in enumerate(decomposition(r)) if ">>" in s["question"]]
    assert steps, "the sample has 'X >> relation' steps"
    got = {pid: (by_id[pid].triple.relation, by_id[pid].triple.object) for pid, _ in steps if pid in by_id}
    assert got == {pid: (s["question"].split(">>")[1].strip(), s["answer"].strip()) for pid, s in steps if pid in by_id}


def test_musique_identical_steps_are_one_piece_owned_by_each_question(converted):
    owners_of = defaultdict(list)
    for r in records("musique"):
        for s in decomposition(r):
            if "#" not in s["question"] and ">>" not in s["question"]:  # the step's text is the prompt
                owners_of[(s["question"].strip(), s["answer"].strip())].append(r["id"])
    shared = {key: ids for key, ids in owners_of.items() if len(ids) > 1}
    assert shared, "the sample has single-hop questions shared by several multi-hop questions"
    got = {(p.prompt, p.answer): p.owners for p in converted["musique"].pieces if (p.prompt, p.answer) in shared}
    assert got == shared


def test_musique_relation_step_reads_as_a_question(converted):
    p = next(p for p in converted["musique-flashrag"].pieces if p.id == "musique:dev_0:0")
    assert (p.prompt, p.answer) == ("Who is the performer of Green?", "Steve Hillage")


def test_musique_chained_step_asks_about_the_earlier_answer(converted):
    p = next(p for p in converted["musique-flashrag"].pieces if p.id == "musique:dev_0:1")
    assert (p.prompt, p.answer) == ("Who is the spouse of Steve Hillage?", "Miquette Giraudy")


def test_musique_step_support_is_its_paragraph(converted):
    p = next(p for p in converted["musique-flashrag"].pieces if p.id == "musique:dev_0:1")
    assert p.support.startswith("Miquette Giraudy (born 9 February 1953")


def test_musique_question_piece_is_the_question(converted):
    q = next(p for p in converted["musique-flashrag"].pieces if p.id == "musique:dev_0:q")
    assert (q.prompt, q.answer, q.hop) == ("Who is the spouse of the Green performer?", "Miquette Giraudy", None)


def test_musique_plain_step_keeps_its_wording(converted):
    p = next(p for p in converted["musique"].pieces if p.id == "musique:2hop__799936_20273:1")
    assert p.prompt == "What year did John Knox past away?"


# ----------------------------------------------------------------------------- relation templates


def test_relation_templates_cover_every_relation_in_the_samples():
    rels = {s["question"].split(">>")[1].strip() for n in ("musique", "musique-flashrag") for r in records(n)
            for s in decomposition(r) if ">>" in s["question"]}
    rels |= {e[1] for r in records("2wikimultihopqa") for e in r["evidences"]}
    rels |= {r["query"].split(" ")[0] for r in records("wikihop")}
    assert {r for r in rels if squash(r.replace("_", " ")).lower() not in RELATION_TEMPLATES} == set()


def test_known_relation_reads_as_its_template():
    assert relation_question("Hey Jude", "author") == "Who is the author of Hey Jude?"


def test_underscored_relation_reads_as_its_template():
    assert relation_question("Paris", "located_in_the_administrative_territorial_entity") == \
        "In which administrative territorial entity is Paris located?"


def test_unknown_relation_reads_what_is_the_relation_of():
    assert relation_question("Rusalka", "number of acts") == "What is the number of acts of Rusalka?"


# ----------------------------------------------------------------------------- HotpotQA


def hotpot_sentence(record: dict, hop: int) -> str:
    title, idx = record["supporting_facts"][hop]
    return squash(dict((t, s) for t, s in record["context"])[title][idx])


def hotpot_clozes(converted) -> list[tuple]:
    by_rec = {r["_id"]: r for r in records("hotpotqa")}
    return [(p, hotpot_sentence(by_rec[p.question_id], p.hop)) for p in converted["hotpotqa"].pieces if p.kind.value == "cloze"]


def test_hotpotqa_every_fact_and_question_is_a_piece_or_a_counted_skip(converted):
    meta, recs = converted["hotpotqa"].meta, records("hotpotqa")
    n_facts = sum(len(r["supporting_facts"]) for r in recs)
    assert meta.pieces_made + sum(meta.pieces_skipped.values()) == n_facts + len(recs)


def test_hotpotqa_cloze_support_is_its_supporting_sentence(converted):
    assert [p.id for p, sentence in hotpot_clozes(converted) if p.support != sentence] == []


def test_hotpotqa_cloze_is_a_sentence_prefix_followed_by_the_answer(converted):
    bad = [p.id for p, s in hotpot_clozes(converted) if not (s.startswith(p.prompt) and p.answer in s[len(p.prompt):])]
    assert bad == []


def test_hotpotqa_cloze_prompt_has_at_least_3_words(converted):
    assert [p.id for p, _ in hotpot_clozes(converted) if len(p.prompt.split()) < 3] == []


def test_hotpotqa_yes_no_is_never_a_cloze_answer(converted):
    assert [p.id for p, _ in hotpot_clozes(converted) if p.answer.lower() in ("yes", "no")] == []


def test_hotpotqa_bridge_entity_is_a_cloze_answer(converted):
    kiss = next(p for p in converted["hotpotqa"].pieces if p.id == "hotpotqa:5a8c7595554299585d9e36b6:0")
    assert kiss.prompt.endswith("starring then 17-year-old") and kiss.answer == "Shirley Temple"


def test_hotpotqa_answer_span_is_a_cloze_answer(converted):
    p = next(p for p in converted["hotpotqa"].pieces if p.id == "hotpotqa:5a8c7595554299585d9e36b6:2")
    assert p.answer == "Chief of Protocol"


def test_hotpotqa_yes_no_question_yields_only_the_question(converted):
    ids = [p.id for p in converted["hotpotqa"].pieces if p.question_id == "5a8b57f25542995d1e6f1371"]
    assert ids == ["hotpotqa:5a8b57f25542995d1e6f1371:q"]


def test_hotpotqa_cloze_prefix_shorter_than_3_words_is_skipped(tmp_path):
    record = {"_id": "fxshort", "question": "Which club did Kasper Schmeichel join in 2011?", "answer": "Leicester City",
              "type": "bridge", "level": "easy", "supporting_facts": [["Kasper Schmeichel", 0]],
              "context": [["Kasper Schmeichel", ["He joined Leicester City in 2011."]]]}
    res = download("hotpotqa", tmp_path / "o", from_path=write_jsonl(tmp_path / "short.jsonl", [record]))
    assert res.meta.pieces_skipped == {"cloze prefix shorter than 3 words": 1}


def test_hotpotqa_native_array_is_sniffed_as_hotpotqa(tmp_path):
    assert download(None, tmp_path, from_path=FIXTURES / "hotpotqa_native_array.json").meta.format == "hotpotqa"


def test_hotpotqa_native_array_pieces(tmp_path):
    res = download(None, tmp_path, from_path=FIXTURES / "hotpotqa_native_array.json")
    assert [(p.id, p.prompt, p.answer) for p in res.pieces] == [
        ("hotpotqa:fx000000000000000000bridge:0", "Rusalka, Op. 114, is a lyric fairy tale opera by", "Antonín Dvořák"),
        ("hotpotqa:fx000000000000000000bridge:1", "Dvořák was born in", "Nelahozeves"),
        ("hotpotqa:fx000000000000000000bridge:q", "In which village was the composer of the opera Rusalka born?", "Nelahozeves"),
        ("hotpotqa:fx0000000000000000comparison:q", "Are the Vltava and the Elbe both rivers of Central Europe?", "yes"),
    ]


def test_hotpotqa_native_array_counts_skipped_pieces_by_reason(tmp_path):
    res = download(None, tmp_path, from_path=FIXTURES / "hotpotqa_native_array.json")
    assert res.meta.pieces_skipped == {"supporting fact points past the paragraph's last sentence": 1,
                                       "yes/no answer: no answer span in the supporting sentence": 2}


# ----------------------------------------------------------------------------- the Hub path, offline


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets library's cache (and any Hub lookup) inside tmp_path."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    return tmp_path


@pytest.fixture(scope="module")
def hub_dirs(tmp_path_factory) -> dict:
    """The HotpotQA fixture in the Hub layout (dicts of parallel lists) as a repository of
    ``<config>/<split>-*.parquet`` files and as a ``save_to_disk`` directory; plus the pieces
    of the same records in the native layout."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("hub")
    hub = json.loads((FIXTURES / "hotpotqa_hub_layout.json").read_text(encoding="utf-8"))
    (root / "repo" / "distractor").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(hub), root / "repo" / "distractor" / "validation-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(hub[:1]), root / "repo" / "distractor" / "train-00000-of-00001.parquet")
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(hub)}).save_to_disk(str(root / "saved"))
    native = download(None, root / "native", from_path=FIXTURES / "hotpotqa_native_array.json")
    return {"repo": root / "repo", "saved": root / "saved", "expected": [(p.id, p.prompt, p.answer, p.support) for p in native.pieces]}


def test_hub_layout_directory_gives_the_native_pieces(tmp_path, hf_cache, hub_dirs):
    res = download("hotpotqa", tmp_path / "h", from_path=hub_dirs["repo"])
    assert [(p.id, p.prompt, p.answer, p.support) for p in res.pieces] == hub_dirs["expected"]


def test_dataset_directory_is_recorded_as_such(tmp_path, hf_cache, hub_dirs):
    assert download("hotpotqa", tmp_path / "h", from_path=hub_dirs["repo"]).meta.input["kind"] == "dataset_dir"


def test_dataset_directory_defaults_to_the_sources_split(tmp_path, hf_cache, hub_dirs):
    assert download("hotpotqa", tmp_path / "h", from_path=hub_dirs["repo"]).meta.split == SOURCES["hotpotqa"].default_split


def test_split_option_picks_that_split_of_a_directory(tmp_path, hf_cache, hub_dirs):
    assert download("hotpotqa", tmp_path / "t", from_path=hub_dirs["repo"], split="train").meta.records_read == 1


def test_missing_split_of_a_directory_is_an_error(tmp_path, hf_cache, hub_dirs):
    with pytest.raises(DataError, match="no split 'test'; it has"):
        download("hotpotqa", tmp_path / "x", from_path=hub_dirs["repo"], split="test")


def test_save_to_disk_directory_gives_the_native_pieces(tmp_path, hf_cache, hub_dirs):
    res = download("hotpotqa", tmp_path / "s", from_path=hub_dirs["saved"])
    assert [(p.id, p.prompt, p.answer, p.support) for p in res.pieces] == hub_dirs["expected"]


def test_hub_layout_parquet_file_is_sniffed_as_hotpotqa(tmp_path, hub_dirs):
    res = download(None, tmp_path / "p", from_path=hub_dirs["repo"] / "distractor" / "validation-00000-of-00001.parquet")
    assert res.meta.format == "hotpotqa"


def test_offline_hub_download_fails_fast(tmp_path, monkeypatch, hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    with pytest.raises(NetworkError):
        download("hotpotqa", tmp_path / "o")
    assert time.monotonic() - t < FAIL_FAST_S


def test_offline_error_names_from_path_and_the_sample(tmp_path, monkeypatch, hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetworkError, match=r"--from PATH.*--sample"):
        download("hotpotqa", tmp_path / "o")


def test_failed_download_writes_nothing(tmp_path, monkeypatch, hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetworkError):
        download("hotpotqa", tmp_path / "o")
    assert not (tmp_path / "o" / "pieces.jsonl").exists()


@pytest.fixture
def unreachable_hub(monkeypatch, hf_cache):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there


def test_unreachable_hub_fails_fast(tmp_path, unreachable_hub):
    t = time.monotonic()
    with pytest.raises(NetworkError):
        download("2wiki", tmp_path / "o")
    assert time.monotonic() - t < FAIL_FAST_S


def test_unreachable_hub_error_names_the_way_out(tmp_path, unreachable_hub):
    with pytest.raises(NetworkError, match=r"unreachable.*--from PATH.*--sample"):
        download("2wiki", tmp_path / "o")


# ----------------------------------------------------------------------------- files outside the Hub


@pytest.fixture
def mquake_t_url(tmp_path, monkeypatch, hf_cache):
    """mquake-t pointed at a local HTTP server holding the fixture as release ``v1``."""
    import dataclasses
    import functools
    import http.server
    import shutil
    import threading

    (tmp_path / "www" / "v1").mkdir(parents=True)
    shutil.copy(FIXTURES / "mquake_t.json", tmp_path / "www" / "v1" / "MQuAKE-T.json")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{{revision}}/MQuAKE-T.json"
    monkeypatch.setitem(SOURCES, "mquake-t", dataclasses.replace(SOURCES["mquake-t"], url=url))
    yield url
    server.shutdown()


def test_file_outside_the_hub_gives_the_local_files_pieces(tmp_path, mquake_t_url):
    local = download("mquake-t", tmp_path / "l", from_path=FIXTURES / "mquake_t.json")
    assert download("mquake-t", tmp_path / "o", revision="v1").pieces == local.pieces


def test_file_outside_the_hub_is_recorded_by_its_url(tmp_path, mquake_t_url):
    inp = download("mquake-t", tmp_path / "o", revision="v1").meta.input
    assert (inp["kind"], inp["url"]) == ("url", mquake_t_url.format(revision="v1"))


def test_file_outside_the_hub_is_recorded_with_its_checksum(tmp_path, mquake_t_url):
    inp = download("mquake-t", tmp_path / "o", revision="v1").meta.input
    assert inp["sha256"] == hashlib.sha256((FIXTURES / "mquake_t.json").read_bytes()).hexdigest()


def test_file_outside_the_hub_is_cached_in_the_hf_cache(tmp_path, mquake_t_url):
    path = Path(download("mquake-t", tmp_path / "o", revision="v1").meta.input["path"])
    assert path.is_relative_to(tmp_path / "hf-datasets")


def test_missing_release_file_is_a_404_error(tmp_path, mquake_t_url):
    with pytest.raises(DataError, match="HTTP 404"):
        download("mquake-t", tmp_path / "o", revision="v2")


def test_cached_release_file_is_used_offline(tmp_path, monkeypatch, mquake_t_url):
    online = download("mquake-t", tmp_path / "o", revision="v1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download("mquake-t", tmp_path / "o2", revision="v1").pieces == online.pieces


# ----------------------------------------------------------------------------- 2WikiMultiHopQA


def test_twowiki_every_evidence_and_question_is_a_piece_a_skip_or_a_merge(converted):
    meta, recs = converted["2wikimultihopqa"].meta, records("2wikimultihopqa")
    n_evidences = sum(len(r["evidences"]) for r in recs)
    made = meta.pieces_made + sum(meta.pieces_skipped.values()) + sum(meta.pieces_merged_as_duplicates.values())
    assert made == n_evidences + len(recs)


def test_twowiki_each_evidence_is_a_piece_with_its_triple(converted):
    got = {p.id: (p.triple.subject, p.triple.relation, p.triple.object) for p in converted["2wikimultihopqa"].pieces if p.triple}
    expected = {f"2wikimultihopqa:{r['_id']}:{k}": tuple(e) for r in records("2wikimultihopqa") for k, e in enumerate(r["evidences"])}
    assert got == expected


def test_twowiki_evidence_piece_answers_with_the_object(converted):
    assert [p.id for p in converted["2wikimultihopqa"].pieces if p.triple and p.answer != p.triple.object] == []


def test_twowiki_evidence_prompt_names_the_subject(converted):
    assert [p.id for p in converted["2wikimultihopqa"].pieces if p.triple and p.triple.subject not in p.prompt] == []


def test_twowiki_evidence_reads_as_a_relation_question(converted):
    first = next(p for p in converted["2wikimultihopqa"].pieces if p.id == "2wikimultihopqa:02ae4663095611ebbdaeac1f6bf848b6:0")
    assert first.prompt == "When was Enemmy published?"


def test_twowiki_evidence_support_is_the_subjects_supporting_sentences(converted):
    first = next(p for p in converted["2wikimultihopqa"].pieces if p.id == "2wikimultihopqa:02ae4663095611ebbdaeac1f6bf848b6:0")
    assert first.support.startswith("Enemmy is a 2013 Indian")


# ----------------------------------------------------------------------------- WikiHop and Bamboogle


def test_wikihop_query_becomes_subject_relation_answer(converted):
    p = next(p for p in converted["wikihop"].pieces if p.id == "wikihop:WH_dev_0:q")
    assert (p.triple.subject, p.triple.relation, p.answer) == ("sms braunschweig", "country", "german empire")


def test_wikihop_query_relation_reads_as_a_question(converted):
    p = next(p for p in converted["wikihop"].pieces if p.id == "wikihop:WH_dev_5:q")
    assert p.prompt == "Where was gregorio di cecco born?"


def test_wikihop_each_record_is_one_piece(converted):
    assert sorted(p.id for p in converted["wikihop"].pieces) == sorted(f"wikihop:{r['id']}:q" for r in records("wikihop"))


def test_bamboogle_each_record_is_one_piece(converted):
    assert sorted(p.id for p in converted["bamboogle"].pieces) == sorted(f"bamboogle:{r['id']}:q" for r in records("bamboogle"))


def test_bamboogle_answer_is_the_first_golden_answer(converted):
    assert {p.question_id: p.answer for p in converted["bamboogle"].pieces} == {r["id"]: r["golden_answers"][0] for r in records("bamboogle")}


def test_bamboogle_prompt_is_the_question(converted):
    assert {p.question_id: p.prompt for p in converted["bamboogle"].pieces} == {r["id"]: r["question"] for r in records("bamboogle")}


# ----------------------------------------------------------------------------- MQuAKE


def mquake_rewrites() -> list[tuple[dict, str, str, str]]:
    """(record, cloze, true target, new target) of every rewrite whose cloze does not leak its target."""
    out = []
    for r in records("mquake"):
        for rw in r["requested_rewrite"]:
            prompt, true = rw["prompt"].format(rw["subject"]), rw["target_true"]["str"]
            if not mentioned(true, prompt):  # "Miguel I of Portugal is a citizen of" -> Portugal is left out
                out.append((r, prompt, true, rw["target_new"]["str"]))
    return out


def test_mquake_each_rewrite_is_a_piece_with_its_new_target_as_counterfactual(converted):
    by_key = {(p.prompt, p.answer): p for p in converted["mquake"].pieces}
    rewrites = mquake_rewrites()
    assert rewrites, "the sample has rewrites"
    assert {(c, t): getattr(by_key.get((c, t)), "counterfactual", None) for _, c, t, _ in rewrites} == {(c, t): n for _, c, t, n in rewrites}


def test_mquake_rewrite_piece_is_owned_by_its_case(converted):
    by_key = {(p.prompt, p.answer): p for p in converted["mquake"].pieces}
    assert [(c, t) for r, c, t, _ in mquake_rewrites() if str(r["case_id"]) not in by_key[(c, t)].owners] == []


def test_mquake_single_hops_are_cloze_pieces(converted):
    kinds = {(p.prompt, p.answer): p.kind.value for p in converted["mquake"].pieces}
    hops = {(h["cloze"], h["answer"]) for r in records("mquake") for h in r["single_hops"]}
    assert {kinds.get(h) for h in hops} == {"cloze"}


def test_mquake_single_hop_aliases_are_kept(converted):
    by_key = {(p.prompt, p.answer): p for p in converted["mquake"].pieces}
    norm = lambda xs: {squash(x).casefold() for x in xs}  # noqa: E731
    missing = [h["cloze"] for r in records("mquake") for h in r["single_hops"]
               if not norm(h["answer_alias"]) - norm([h["answer"]]) <= norm(by_key[(h["cloze"], h["answer"])].aliases)]
    assert missing == []


def test_mquake_question_piece_has_the_new_answer_as_counterfactual(converted):
    by_id = {p.id: p for p in converted["mquake"].pieces}
    got = {r["case_id"]: (by_id[f"mquake:{r['case_id']}:q"].prompt, by_id[f"mquake:{r['case_id']}:q"].answer,
                          by_id[f"mquake:{r['case_id']}:q"].counterfactual) for r in records("mquake")}
    assert got == {r["case_id"]: (r["questions"][0], r["answer"], r["new_answer"]) for r in records("mquake")}


def test_mquake_sample_has_no_counterfactual_conflicts(converted):
    assert converted["mquake"].meta.counterfactual_conflicts_first_kept == 0


@pytest.fixture(scope="module")
def mquake_t(tmp_path_factory) -> dict:
    res = download("mquake-t", tmp_path_factory.mktemp("mquake-t"), from_path=FIXTURES / "mquake_t.json")
    return {p.id: p for p in res.pieces}


def test_mquake_t_rewrite_is_matched_by_its_cloze(mquake_t):
    assert mquake_t["mquake-t:1:1"].counterfactual == "Rishi Sunak"


def test_mquake_t_rewrite_with_another_cloze_is_matched_by_wikidata_triple(mquake_t):
    assert mquake_t["mquake-t:2:0"].counterfactual == "Canada"


def test_mquake_t_unedited_hop_has_no_counterfactual(mquake_t):
    assert mquake_t["mquake-t:1:0"].counterfactual is None


def test_mquake_t_question_counterfactual_is_the_new_answer(mquake_t):
    assert mquake_t["mquake-t:1:q"].counterfactual == "Rishi Sunak"


def test_mquake_t_extended_answer_is_an_alias(mquake_t):
    assert "Theresa May" in mquake_t["mquake-t:1:q"].aliases


def test_mquake_t_hop_carries_its_labelled_triple(mquake_t):
    assert mquake_t["mquake-t:2:1"].triple.relation == "capital"


def test_mquake_t_fixture_makes_six_pieces(mquake_t):
    assert len(mquake_t) == 6


# ----------------------------------------------------------------------------- plain pieces files


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return download(None, tmp_path_factory.mktemp("plain"), from_path=FIXTURES / "plain_pieces.jsonl")


def test_plain_pieces_file_is_sniffed_as_pieces(plain):
    assert plain.meta.format == "pieces"


def test_plain_pieces_keep_given_ids_and_number_the_rest(plain):
    assert [p.id for p in plain.pieces] == ["mine:paris:0", "mine:paris:1", "mine:paris:q", "pieces:3:0"]


def test_plain_piece_keeps_its_counterfactual(plain):
    assert plain.pieces[0].counterfactual == "Rome"


def test_plain_piece_keeps_its_kind(plain):
    assert plain.pieces[0].kind.value == "cloze"


def test_plain_piece_reads_its_triple(plain):
    assert plain.pieces[3].triple.object == "Bram Stoker"


def test_plain_pieces_count_leaking_pieces(plain):
    assert plain.meta.pieces_skipped == {"answer appears in its own prompt": 1}


def test_written_pieces_file_reads_back_unchanged(tmp_path, plain):
    assert download(None, tmp_path, from_path=plain.pieces_path, format="pieces").pieces == plain.pieces


# ----------------------------------------------------------------------------- bad input


def musique_line(**changes) -> dict:
    rec = {"id": "2hop__1_2", "question": "Who is the spouse of the Green performer?", "answer": "Miquette Giraudy",
           "answer_aliases": [], "answerable": True, "paragraphs": [],
           "question_decomposition": [{"id": 1, "question": "Green >> performer", "answer": "Steve Hillage", "paragraph_support_idx": None},
                                      {"id": 2, "question": "#1 >> spouse", "answer": "Miquette Giraudy", "paragraph_support_idx": None}]}
    rec.update(changes)
    return rec


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


BAD_INPUTS = pytest.mark.parametrize(
    "rows, pattern",
    [
        ([musique_line(), '{"id": "x", "question": '], r"bad\.jsonl:2: not valid JSON"),
        ([musique_line(), musique_line(id="b", question_decomposition=[{"question": "Green >> performer"}])],
         r"bad\.jsonl:2: field 'question_decomposition\[0\]\.answer': missing"),
        ([musique_line(), musique_line(id="b", answer="  ")], r"bad\.jsonl:2: field 'answer': empty"),
        ([musique_line(), musique_line(id="2hop__3_4", question_decomposition=[{"question": "#2 >> spouse", "answer": "A"}])],
         r"bad\.jsonl:2: field 'question_decomposition\[0\]\.question': refers to #2"),
        ([musique_line(), {"case_id": 1, "requested_rewrite": [], "single_hops": []}], r"bad\.jsonl:2: mixed formats: .*mquake"),
        ([musique_line(), [1, 2]], r"bad\.jsonl:2: expected a JSON object, got list"),
        ([musique_line(), musique_line()], r"bad\.jsonl:2: field 'id': duplicate piece id 'musique:2hop__1_2:0'"),
    ],
    ids=["malformed-json", "missing-field", "empty-answer", "forward-reference", "mixed-formats", "not-an-object", "duplicate-id"],
)


@BAD_INPUTS
def test_bad_record_error_names_file_line_and_problem(tmp_path, rows, pattern):
    with pytest.raises(DataError, match=pattern):
        download("musique", tmp_path / "out", from_path=write_jsonl(tmp_path / "bad.jsonl", rows))


@BAD_INPUTS
def test_bad_record_error_suggests_skip_bad(tmp_path, rows, pattern):
    with pytest.raises(DataError, match="--skip-bad"):
        download("musique", tmp_path / "out", from_path=write_jsonl(tmp_path / "bad.jsonl", rows))


@BAD_INPUTS
def test_bad_record_leaves_earlier_output_as_it_was(tmp_path, rows, pattern):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pieces.jsonl").write_text("OLD\n")
    with pytest.raises(DataError):
        download("musique", out, from_path=write_jsonl(tmp_path / "bad.jsonl", rows))
    assert ((out / "pieces.jsonl").read_text(), (out / "download.json").exists()) == ("OLD\n", False)


@BAD_INPUTS
def test_skip_bad_skips_only_the_bad_record(tmp_path, rows, pattern):
    meta = download("musique", tmp_path / "out", from_path=write_jsonl(tmp_path / "bad.jsonl", rows), skip_bad=True).meta
    assert (meta.records_used, sum(meta.records_skipped.values())) == (1, len(rows) - 1)


SKIP_ROWS = [musique_line(), '{"broken', musique_line(id="b", answer=""), musique_line(id="c", answerable=False),
             musique_line(id="d", question_decomposition=[{"question": "x"}]), musique_line(id="e", question_decomposition=[{"question": "y"}])]
SKIPS_BY_REASON = {"not valid JSON": 1, "empty: answer": 1, "unanswerable (answerable: false)": 1, "missing: question_decomposition[].answer": 2}


@pytest.fixture
def skipped(tmp_path):
    return download("musique", tmp_path / "o", from_path=write_jsonl(tmp_path / "in.jsonl", SKIP_ROWS), skip_bad=True)


def test_skip_bad_reads_every_record_and_uses_the_good_one(skipped):
    assert (skipped.meta.records_read, skipped.meta.records_used) == (len(SKIP_ROWS), 1)


def test_skip_bad_counts_skipped_records_by_reason(skipped):
    assert skipped.meta.records_skipped == SKIPS_BY_REASON


def test_download_json_holds_the_skip_counts(skipped):
    assert json.loads(skipped.meta_path.read_text(encoding="utf-8"))["records_skipped"] == SKIPS_BY_REASON


def test_unanswerable_musique_is_counted_even_without_skip_bad(tmp_path):
    rows = [musique_line(), musique_line(id="u", answerable=False)]
    meta = download("musique-full", tmp_path, from_path=write_jsonl(tmp_path / "full.jsonl", rows)).meta
    assert (meta.records_skipped, meta.records_used) == ({"unanswerable (answerable: false)": 1}, 1)


def test_json_array_error_names_the_record(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": [musique_line(), musique_line(id="zz", question="")]}))
    with pytest.raises(DataError, match=r"a\.json record 2: field 'question': empty"):
        download(None, tmp_path / "o", from_path=tmp_path / "a.json")


def test_broken_json_document_error_names_the_line(tmp_path):
    (tmp_path / "broken.json").write_text('[{"id": 1},\n {"id": }]')
    with pytest.raises(DataError, match=r"broken\.json:2: not valid JSON"):
        download(None, tmp_path / "o", from_path=tmp_path / "broken.json")


def test_json_object_without_a_data_list_is_an_error(tmp_path):
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"obj\.json: a JSON object must hold its records in a 'data' list"):
        download(None, tmp_path / "o", from_path=tmp_path / "obj.json")


def test_parquet_error_names_the_record(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": "t1", "question": "Q?", "golden_answers": ["A"]},
                                         {"id": "t2", "question": "R?", "golden_answers": []}]), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet record 2: field 'golden_answers': empty answer list"):
        download("bamboogle", tmp_path / "o", from_path=tmp_path / "b.parquet")


def test_unknown_record_format_error_lists_the_keys(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(DataError, match=r"odd\.jsonl:1: unknown record format \(keys: foo, bar\); pass --format"):
        download(None, tmp_path / "o", from_path=path)


def test_forced_format_reports_the_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(DataError, match=r"odd\.jsonl:1: field 'question': missing"):
        download(None, tmp_path / "o", from_path=path, format="bamboogle")


def test_unknown_format_name_is_an_error(tmp_path):
    with pytest.raises(DataError, match="unknown format 'csv'"):
        download(None, tmp_path / "o", from_path=write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}]), format="csv")


def test_format_must_match_the_sources(tmp_path):
    with pytest.raises(DataError, match="does not match musique"):
        download("musique", tmp_path / "o", from_path=write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}]), format="hotpotqa")


def test_limit_below_one_is_an_error(tmp_path):
    with pytest.raises(DataError, match="--limit must be at least 1, got 0"):
        download("musique", tmp_path / "o", from_path="sample", limit=0)


def test_unsupported_file_type_is_an_error(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        download(None, tmp_path / "o", from_path=tmp_path / "x.csv")


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        download(None, tmp_path / "o", from_path=tmp_path / "missing.jsonl")


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records to read"):
        download(None, tmp_path / "o", from_path=tmp_path / "empty.jsonl")


LEAK_ONLY = [{"prompt": "Paris is the capital of France, Paris", "answer": "Paris"}]


def test_no_pieces_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no knowledge pieces made"):
        download(None, tmp_path / "o", from_path=write_jsonl(tmp_path / "leak.jsonl", LEAK_ONLY))


def test_no_pieces_writes_no_file(tmp_path):
    with pytest.raises(DataError):
        download(None, tmp_path / "o", from_path=write_jsonl(tmp_path / "leak.jsonl", LEAK_ONLY))
    assert not (tmp_path / "o" / "pieces.jsonl").exists()
