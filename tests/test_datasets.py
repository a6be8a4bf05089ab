"""gradcouple.datasets, specified on the real samples bundled with the package (12 records per
dataset, 60 of RippleEdits) and on schema-faithful fixtures: the registry, every format's pieces
(expected values read from the input records, not from the parsers), the benchmark pieces of
RippleEdits and MQuAKE (edits, originals, tests, conditions), download.json, the Hub path
through local dataset directories, and every kind of bad input."""

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
    "rippleedits": "rippleedits_compositional.sample.jsonl",
}
#: test name -> the format its records are in
FORMAT_OF = {name: "musique" if name == "musique-flashrag" else name for name in FILES}
#: records per bundled sample: the first 12 of each shared file, the first 60 of RippleEdits'
RECORDS_PER_SAMPLE = {name: 60 if name == "rippleedits" else 12 for name in FILES}
#: samples whose records are multi-hop questions (RippleEdits records are edits)
QUESTION_SAMPLES = [n for n in FILES if n not in ("wikihop", "rippleedits")]
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
    "query with no answers",
}
#: The keys of download.json, in file order.
META_KEYS = [
    "source", "format", "dataset", "input", "split", "revision", "limit", "skip_bad",
    "records_read", "records_used", "records_skipped", "pieces_made", "pieces_per_kind",
    "pieces_merged_as_duplicates", "counterfactual_conflicts_first_kept", "pieces_skipped",
    "leak_rule", "package_version", "pieces_per_role", "pieces_per_criterion",
]
LEAK = "answer appears in its own prompt"


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


@pytest.mark.parametrize("alias, name", [("hotpotqa-distractor", "hotpotqa"), ("2WIKI", "2wikimultihopqa"), (" Musique ", "musique"),
                                         ("ripple-edits", "rippleedits")])
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


def test_rippleedits_source_is_the_mit_github_release_with_its_three_subsets_as_splits():
    src = SOURCES["rippleedits"]
    assert (src.license, src.hub, src.splits, src.default_split) == ("MIT", "github:edenbiran/RippleEdits", ("popular", "random", "recent"), "popular")


def test_hotpotqa_settings_are_hub_configs():
    assert (SOURCES["hotpotqa"].hub_config, SOURCES["hotpotqa-fullwiki"].hub_config) == ("distractor", "fullwiki")


def test_unknown_dataset_error_lists_the_known_ones():
    with pytest.raises(DataError, match="unknown dataset 'nope'.*musique"):
        resolve_source("nope")


def test_formats_are_the_parsers():
    assert set(FORMATS) == {"hotpotqa", "musique", "2wikimultihopqa", "wikihop", "bamboogle", "mquake", "rippleedits", "counterfact",
                            "easyedit", "pieces"}


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
def test_every_bundled_sample_holds_its_documented_number_of_records(name):
    assert len(records(name)) == RECORDS_PER_SAMPLE[name]


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
def test_no_two_plain_facts_share_prompt_and_answer(converted, name):
    facts = [p for p in converted[name].pieces if p.role is None]
    assert len({(p.prompt, p.answer) for p in facts}) == len(facts)


@pytest.mark.parametrize("name", FILES)
def test_no_two_benchmark_pieces_of_one_edit_and_role_share_prompt_and_answer(converted, name):
    linked = [p for p in converted[name].pieces if p.role is not None and p.role.value != "edit"]
    assert len({(p.prompt, p.answer, p.role, p.edit_id) for p in linked}) == len(linked)


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
    record_ids = {f"{FORMAT_OF[name]}:{r.get('_id', r.get('id', r.get('case_id', i)))}" for i, r in enumerate(records(name))}
    assert {p.id.rsplit(":", 1)[0] for p in converted[name].pieces} <= record_ids


@pytest.mark.parametrize("name", FILES)
def test_question_id_is_the_record_part_of_the_piece_id(converted, name):
    assert [p.id for p in converted[name].pieces if p.id.split(":")[1] != p.question_id] == []


@pytest.mark.parametrize("name", FILES)
def test_question_piece_id_ends_with_q(converted, name):
    assert [p.id for p in converted[name].pieces if p.role is None and p.kind.value == "multi_hop" and not p.id.endswith(":q")] == []


@pytest.mark.parametrize("name", FILES)
def test_other_plain_fact_ids_end_with_their_hop(converted, name):
    assert [p.id for p in converted[name].pieces
            if p.role is None and p.kind.value != "multi_hop" and p.id.rsplit(":", 1)[1] != str(p.hop)] == []


@pytest.mark.parametrize("name", FILES)
def test_exactly_the_multi_hop_pieces_have_no_hop(converted, name):
    assert [p.id for p in converted[name].pieces if (p.hop is None) != (p.kind.value == "multi_hop")] == []


@pytest.mark.parametrize("name", FILES)
def test_first_record_sniffs_as_its_format(name):
    assert sniff_format(records(name)[0]) == FORMAT_OF[name]


@pytest.mark.parametrize("name", QUESTION_SAMPLES)
def test_each_question_not_giving_away_its_answer_is_a_multi_hop_piece(converted, name):
    expected = {question_and_answer(name, r) for r in records(name)}
    expected = {(q, a) for q, a in expected if not mentioned(a, q)}
    assert {(p.prompt, p.answer) for p in converted[name].pieces if p.kind.value == "multi_hop" and p.role is None} == expected


@pytest.mark.parametrize("name", QUESTION_SAMPLES)
def test_pieces_per_kind_counts_the_multi_hop_questions_and_tests(converted, name):
    questions = {question_and_answer(name, r) for r in records(name)}
    tests = [(squash(r["questions"][0]), r["new_answer"]) for r in records(name)] if name == "mquake" else []
    expected = sum(not mentioned(a, q) for q, a in questions) + sum(not mentioned(a, q) for q, a in tests)
    assert converted[name].meta.pieces_per_kind.get("multi_hop", 0) == expected


@pytest.mark.parametrize("name", [n for n in FILES if n not in ("mquake", "rippleedits")])
def test_datasets_without_edits_count_no_roles_or_criteria(converted, name):
    assert (converted[name].meta.pieces_per_role, converted[name].meta.pieces_per_criterion) == ({}, {})


@pytest.mark.parametrize("name", FILES)
def test_pieces_per_role_adds_up_to_the_pieces_with_a_role(converted, name):
    assert sum(converted[name].meta.pieces_per_role.values()) == sum(p.role is not None for p in converted[name].pieces)


@pytest.mark.parametrize("name", FILES)
def test_pieces_per_kind_adds_up_to_pieces_made(converted, name):
    assert sum(converted[name].meta.pieces_per_kind.values()) == converted[name].meta.pieces_made


@pytest.mark.parametrize("name", ["hotpotqa", "mquake", "musique", "rippleedits"])
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
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
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


def mquake_case(converted, case_id) -> list:
    """The pieces of one MQuAKE case: those it owns."""
    return [p for p in converted["mquake"].pieces if str(case_id) in p.owners]


def test_mquake_each_rewrite_is_a_piece_with_its_new_target_as_counterfactual(converted):
    rewrites = mquake_rewrites()
    assert rewrites, "the sample has rewrites"
    got = {(r["case_id"], c, t): next((p.counterfactual for p in mquake_case(converted, r["case_id"]) if (p.prompt, p.answer) == (c, t)), None)
           for r, c, t, _ in rewrites}
    assert got == {(r["case_id"], c, t): n for r, c, t, n in rewrites}


def test_mquake_rewrite_piece_is_the_original_of_an_edit_of_its_case(converted):
    originals = {(p.question_id, p.prompt, p.answer) for p in converted["mquake"].pieces if p.role and p.role.value == "original"}
    assert [(c, t) for r, c, t, _ in mquake_rewrites() if (str(r["case_id"]), c, t) not in originals] == []


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


def mquake_edits() -> dict[str, tuple]:
    """Edit piece id -> (case, cloze, new target, true target, subject) of every rewrite whose
    cloze does not mention its new target."""
    out = {}
    for r in records("mquake"):
        for j, rw in enumerate(r["requested_rewrite"]):
            cloze, new = rw["prompt"].format(rw["subject"]), rw["target_new"]["str"]
            if not mentioned(new, cloze):
                out[f"mquake:{r['case_id']}:edit{j}"] = (str(r["case_id"]), cloze, new, rw["target_true"]["str"], rw["subject"])
    return out


def mquake_by_role(converted, role: str) -> dict:
    return {p.id: p for p in converted["mquake"].pieces if p.role and p.role.value == role}


def test_mquake_each_requested_rewrite_is_an_edit_piece_toward_its_new_target(converted):
    got = {i: (p.question_id, p.prompt, p.answer) for i, p in mquake_by_role(converted, "edit").items()}
    assert got == {i: (case, cloze, new) for i, (case, cloze, new, _, _) in mquake_edits().items()}


def test_mquake_edit_answer_before_is_the_true_target(converted):
    got = {i: p.answer_before for i, p in mquake_by_role(converted, "edit").items()}
    assert got == {i: true for i, (_, _, _, true, _) in mquake_edits().items()}


def test_mquake_edit_triple_runs_from_the_subject_to_the_new_target(converted):
    got = {i: (p.triple.subject, p.triple.object) for i, p in mquake_by_role(converted, "edit").items()}
    assert got == {i: (subject, new) for i, (_, _, new, _, subject) in mquake_edits().items()}


def test_mquake_each_edit_has_one_original_answering_the_true_target_with_the_new_as_counterfactual(converted):
    originals = defaultdict(list)
    for p in mquake_by_role(converted, "original").values():
        originals[p.edit_id].append((p.answer, p.counterfactual))
    assert dict(originals) == {i: [(true, new)] for i, (_, _, new, true, _) in mquake_edits().items()}


def test_mquake_one_test_per_case_asks_the_question_with_the_new_answer(converted):
    got = {p.question_id: (p.prompt, p.answer, p.answer_before) for p in mquake_by_role(converted, "test").values()}
    assert got == {str(r["case_id"]): (squash(r["questions"][0]), r["new_answer"], r["answer"]) for r in records("mquake")}


def test_mquake_test_id_is_its_case_and_test(converted):
    assert sorted(mquake_by_role(converted, "test")) == sorted(f"mquake:{r['case_id']}:test" for r in records("mquake"))


def test_mquake_test_links_to_the_first_edit_of_its_case(converted):
    first = {}
    for i, (case, *_rest) in mquake_edits().items():
        first.setdefault(case, i)
    assert {p.question_id: p.edit_id for p in mquake_by_role(converted, "test").values()} == first


def test_mquake_test_criterion_is_multi_hop(converted):
    assert {p.criterion for p in mquake_by_role(converted, "test").values()} == {"multi_hop"}


def test_mquake_test_aliases_are_the_new_answer_aliases(converted):
    norm = lambda xs: {squash(x).casefold() for x in xs}  # noqa: E731
    got = {p.question_id: norm(p.aliases) for p in mquake_by_role(converted, "test").values()}
    assert got == {str(r["case_id"]): norm(r["new_answer_alias"]) - norm([r["new_answer"]]) for r in records("mquake")}


def test_mquake_edits_of_a_case_share_its_question_id(converted):
    assert [p.id for p in converted["mquake"].pieces if p.role is not None and p.question_id != p.id.split(":")[1]] == []


def test_mquake_single_hop_that_no_rewrite_names_stays_a_plain_fact(converted):
    by_id = {p.id: p for p in converted["mquake"].pieces}
    untouched = [f"mquake:{r['case_id']}:{k}" for r in records("mquake") for k, h in enumerate(r["single_hops"])
                 if h["cloze"].casefold() not in {rw["prompt"].format(rw["subject"]).casefold() for rw in r["requested_rewrite"]}]
    assert untouched, "the sample has unedited hops"
    assert [i for i in untouched if i in by_id and by_id[i].role is not None] == []


def test_mquake_download_json_counts_edits_originals_and_tests(converted):
    assert converted["mquake"].meta.pieces_per_role == {"edit": len(mquake_edits()), "original": len(mquake_edits()),
                                                        "test": len(records("mquake"))}


def test_mquake_download_json_counts_the_tests_per_criterion(converted):
    assert converted["mquake"].meta.pieces_per_criterion == {"multi_hop": len(records("mquake"))}


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


def test_mquake_t_fixture_makes_six_facts_two_edits_and_two_tests(mquake_t):
    roles = [p.role.value if p.role and p.role.value in ("edit", "test") else "fact" for p in mquake_t.values()]
    assert sorted(roles) == ["edit"] * 2 + ["fact"] * 6 + ["test"] * 2


def test_mquake_t_edit_matched_by_wikidata_triple_keeps_the_rewrite_cloze(mquake_t):
    assert (mquake_t["mquake-t:2:edit0"].prompt, mquake_t["mquake-t:2:edit0"].answer) == ("Taylor Swift is a citizen of", "Canada")


def test_mquake_t_hop_matched_by_wikidata_triple_is_the_original_of_that_edit(mquake_t):
    assert mquake_t["mquake-t:2:0"].edit_id == "mquake-t:2:edit0"


# ----------------------------------------------------------------------------- RippleEdits

RIPPLE_NATIVE = FIXTURES / "rippleedits_native.json"
#: the six criteria of the native format (README spelling), and the loader's other spelling
CRITERIA = {"Relation_Specifity", "Logical_Generalization", "Subject_Aliasing", "Compositionality_I", "Compositionality_II", "Forgetfulness"}
SPELLING = {"Relation_Specificity": "Relation_Specifity"}
NO_ANSWERS = "query with no answers"


def ripple_by_role(result, role: str) -> dict:
    return {p.id: p for p in result.pieces if p.role and p.role.value == role}


def restructured_expected() -> dict:
    """What the bundled sample must become, read from its records: per record id, the edit
    (prompt, new, true), the distinct non-leaking test and condition (prompt, answer) pairs and
    test -> its condition queries; plus the leaking pieces and duplicates merged within an edit."""
    out = {"edits": {}, "tests": set(), "conditions": set(), "condition_of": defaultdict(set), "leaks": 0, "merged": 0,
           "originals": 0}
    for i, r in enumerate(records("rippleedits")):
        e, rid = r["edit"], str(i)
        assert e["prompt"].endswith(f" {e['target_id']}."), "restructured edits end with their new target"
        prefix, new, true = e["prompt"][: -len(e["target_id"]) - 2], e["target_id"], e["original_fact"]["target_id"]
        out["edits"][rid] = (prefix, new, true)
        if mentioned(true, prefix):
            out["leaks"] += 1
        else:
            out["originals"] += 1
        for role, key in (("tests", "compositional_query"), ("conditions", "condition_query")):
            pairs = [(p[key]["prompt"], p[key]["answer"]) for p in r["compositional_I_problems"]]
            kept = [(q, a) for q, a in pairs if not mentioned(a, q)]
            out["leaks"] += len(pairs) - len(kept)
            out["merged"] += len(kept) - len(set(kept))
            out[role] |= {(rid, q, a) for q, a in kept}
        for p in r["compositional_I_problems"]:
            t, c = p["compositional_query"], p["condition_query"]
            out["condition_of"][(rid, t["prompt"], t["answer"])].add((c["prompt"], c["answer"]))
    return out


@pytest.fixture(scope="module")
def ripple_expected() -> dict:
    return restructured_expected()


def test_rippleedits_sample_makes_one_edit_per_record_and_one_piece_per_distinct_query(converted, ripple_expected):
    x = ripple_expected
    assert converted["rippleedits"].meta.pieces_per_role == {"edit": len(x["edits"]), "original": x["originals"],
                                                             "test": len(x["tests"]), "condition": len(x["conditions"])}


def test_rippleedits_sample_counts_its_tests_as_compositionality_i(converted, ripple_expected):
    assert converted["rippleedits"].meta.pieces_per_criterion == {"Compositionality_I": len(ripple_expected["tests"])}


def test_rippleedits_download_json_holds_the_counts_per_role_and_criterion(converted):
    meta = json.loads(converted["rippleedits"].meta_path.read_text(encoding="utf-8"))
    roles = defaultdict(int)
    for p in converted["rippleedits"].pieces:
        roles[p.role.value] += 1
    assert (meta["pieces_per_role"], meta["pieces_per_criterion"]) == (dict(roles), {"Compositionality_I": roles["test"]})


def test_rippleedits_sample_counts_every_leaking_query_and_original(converted, ripple_expected):
    assert converted["rippleedits"].meta.pieces_skipped == {LEAK: ripple_expected["leaks"]}


def test_rippleedits_sample_merges_only_repeated_queries_of_one_edit(converted, ripple_expected):
    assert sum(converted["rippleedits"].meta.pieces_merged_as_duplicates.values()) == ripple_expected["merged"]


def test_rippleedits_pieces_are_cloze_prefixes(converted):
    assert {p.kind.value for p in converted["rippleedits"].pieces} == {"cloze"}


def test_rippleedits_edit_is_the_edit_prompt_without_its_new_target(converted, ripple_expected):
    got = {p.question_id: (p.prompt, p.answer, p.answer_before) for p in ripple_by_role(converted["rippleedits"], "edit").values()}
    assert got == ripple_expected["edits"]


def test_rippleedits_dicaprio_edit_moves_syria_in_for_the_united_states(converted):
    edit = ripple_by_role(converted["rippleedits"], "edit")["rippleedits:0:edit"]
    assert (edit.prompt, edit.answer, edit.answer_before) == (
        "The name of the country of citizenship of Leonardo DiCaprio is", "Syria", "United States of America")


def test_rippleedits_edit_triple_runs_from_the_subject_to_the_new_target(converted):
    triple = ripple_by_role(converted["rippleedits"], "edit")["rippleedits:0:edit"].triple
    assert (triple.subject, triple.relation, triple.object) == ("Leonardo DiCaprio", "country of citizenship", "Syria")


def test_rippleedits_original_asks_the_edit_prompt_for_the_true_target(converted):
    edits = ripple_by_role(converted["rippleedits"], "edit")
    got = {p.id: (p.prompt, p.answer, p.counterfactual) for p in ripple_by_role(converted["rippleedits"], "original").values()}
    assert got == {e.id.replace(":edit", ":original"): (e.prompt, e.answer_before, e.answer)
                   for e in edits.values() if not mentioned(e.answer_before, e.prompt)}


def test_rippleedits_original_links_to_the_edit_of_its_record(converted):
    assert {p.id: p.edit_id for p in ripple_by_role(converted["rippleedits"], "original").values()} == {
        p.id: p.id.replace(":original", ":edit") for p in ripple_by_role(converted["rippleedits"], "original").values()}


def test_rippleedits_tests_are_the_compositional_queries(converted, ripple_expected):
    assert {(p.question_id, p.prompt, p.answer) for p in ripple_by_role(converted["rippleedits"], "test").values()} == ripple_expected["tests"]


def test_rippleedits_conditions_are_the_condition_queries(converted, ripple_expected):
    assert {(p.question_id, p.prompt, p.answer) for p in ripple_by_role(converted["rippleedits"], "condition").values()} == ripple_expected["conditions"]


@pytest.mark.parametrize("role", ["original", "test", "condition"])
def test_rippleedits_linked_piece_points_to_the_edit_of_its_own_question(converted, role):
    edits = ripple_by_role(converted["rippleedits"], "edit")
    assert [p.id for p in ripple_by_role(converted["rippleedits"], role).values()
            if p.edit_id not in edits or edits[p.edit_id].question_id != p.question_id] == []


def test_rippleedits_test_links_to_a_condition_of_the_same_edit(converted):
    conditions = ripple_by_role(converted["rippleedits"], "condition")
    assert [p.id for p in ripple_by_role(converted["rippleedits"], "test").values()
            if p.condition_id is not None and (p.condition_id not in conditions or conditions[p.condition_id].edit_id != p.edit_id)] == []


def test_rippleedits_test_condition_is_its_problems_condition_query(converted, ripple_expected):
    conditions = ripple_by_role(converted["rippleedits"], "condition")
    wrong = [p.id for p in ripple_by_role(converted["rippleedits"], "test").values() if p.condition_id is not None
             and (conditions[p.condition_id].prompt, conditions[p.condition_id].answer)
             not in ripple_expected["condition_of"][(p.question_id, p.prompt, p.answer)]]
    assert wrong == []


def test_rippleedits_every_test_whose_condition_does_not_leak_links_to_it(converted, ripple_expected):
    unlinked = [p.id for p in ripple_by_role(converted["rippleedits"], "test").values() if p.condition_id is None
                and any(not mentioned(a, q) for q, a in ripple_expected["condition_of"][(p.question_id, p.prompt, p.answer)])]
    assert unlinked == []


def test_rippleedits_condition_shared_by_two_edits_stays_one_piece_per_edit(converted):
    owners = defaultdict(set)
    for i, r in enumerate(records("rippleedits")):
        for p in r["compositional_I_problems"]:
            c = p["condition_query"]
            if not mentioned(c["answer"], c["prompt"]):
                owners[(c["prompt"], c["answer"])].add(str(i))
    shared = {k: v for k, v in owners.items() if len(v) > 1}
    assert shared, "the sample has condition queries shared by several edits (Terengganu)"
    got = defaultdict(set)
    for p in ripple_by_role(converted["rippleedits"], "condition").values():
        got[(p.prompt, p.answer)].add(p.question_id)
    assert {k: got[k] for k in shared} == shared


def test_rippleedits_same_edit_twice_makes_two_edits_none_merged(tmp_path):
    line = sample_path(FILES["rippleedits"]).read_text(encoding="utf-8").splitlines()[0]
    (tmp_path / "twice.jsonl").write_text(f"{line}\n{line}\n", encoding="utf-8")
    meta = download("rippleedits", tmp_path / "o", from_path=tmp_path / "twice.jsonl").meta
    assert (meta.pieces_per_role["edit"], meta.pieces_merged_as_duplicates) == (2, {})


def test_rippleedits_record_whose_edit_prompt_mentions_its_new_target_is_skipped(tmp_path):
    good = json.loads(sample_path(FILES["rippleedits"]).read_text(encoding="utf-8").splitlines()[0])
    bad = json.loads(json.dumps(good))
    bad["edit"]["prompt"] = "The name of the country which Constitution of India is associated with is India."
    bad["edit"]["target_id"] = "India"
    meta = download("rippleedits", tmp_path / "o", from_path=write_jsonl(tmp_path / "in.jsonl", [good, bad])).meta
    assert (meta.records_used, meta.records_skipped) == (1, {"edit prompt mentions its new target": 1})


def test_rippleedits_edit_without_a_target_ending_is_a_located_error(tmp_path):
    rec = json.loads(sample_path(FILES["rippleedits"]).read_text(encoding="utf-8").splitlines()[0])
    rec["edit"]["prompt"] = "Syria."
    rec["edit"]["original_fact"]["prompt"] = "United States of America."
    with pytest.raises(DataError, match=r"in\.jsonl:1: field 'edit\.prompt': cannot tell where the new target begins"):
        download("rippleedits", tmp_path / "o", from_path=write_jsonl(tmp_path / "in.jsonl", [rec]))


# RippleEdits, native benchmark format (tests/fixtures/rippleedits_native.json)


def native_entries() -> list[dict]:
    return json.loads(RIPPLE_NATIVE.read_text(encoding="utf-8"))


def native_queries(entry: dict):
    """(criterion, test index, test, kind, query) of every query of an entry, in file order."""
    for key, tests in entry.items():
        criterion = SPELLING.get(key, key)
        if criterion in CRITERIA:
            for i, test in enumerate(tests):
                for kind in ("test_queries", "condition_queries"):
                    for q in test[kind]:
                        yield criterion, i, test, kind, q


def native_expected() -> dict:
    """Counts the native fixture must give, read from its entries."""
    roles, criteria, skipped = defaultdict(int), defaultdict(int), defaultdict(int)
    for e in native_entries():
        roles["edit"] += 1
        roles["original"] += "previous_fact" in e["edit"]
        seen = {"test_queries": {}, "condition_queries": {}}
        for criterion, _, _, kind, q in native_queries(e):
            if not q["answers"]:
                skipped[NO_ANSWERS] += 1
            elif mentioned(q["answers"][0]["value"], q["prompt"]):
                skipped[LEAK] += 1
            else:
                seen[kind].setdefault((q["prompt"], q["answers"][0]["value"]), criterion)
        roles["test"] += len(seen["test_queries"])
        roles["condition"] += len(seen["condition_queries"])
        for criterion in seen["test_queries"].values():
            criteria[criterion] += 1
    return {"roles": dict(roles), "criteria": dict(sorted(criteria.items())), "skipped": dict(sorted(skipped.items()))}


@pytest.fixture(scope="module")
def ripple_native(tmp_path_factory):
    return download(None, tmp_path_factory.mktemp("ripple-native"), from_path=RIPPLE_NATIVE)


def test_rippleedits_native_fixture_covers_every_criterion_and_an_empty_one():
    entries = native_entries()
    assert ({c for e in entries for c, *_ in native_queries(e)}, any(t == [] for e in entries for t in e.values())) == (CRITERIA, True)


def test_rippleedits_native_entry_is_sniffed_as_rippleedits(ripple_native):
    assert ripple_native.meta.format == "rippleedits"


def test_rippleedits_native_reads_every_entry(ripple_native):
    assert (ripple_native.meta.records_used, ripple_native.meta.records_skipped) == (len(native_entries()), {})


def test_rippleedits_native_pieces_per_role(ripple_native):
    assert ripple_native.meta.pieces_per_role == native_expected()["roles"]


def test_rippleedits_native_pieces_per_criterion(ripple_native):
    assert ripple_native.meta.pieces_per_criterion == native_expected()["criteria"]


def test_rippleedits_native_counts_leaks_and_queries_without_answers(ripple_native):
    assert ripple_native.meta.pieces_skipped == native_expected()["skipped"]


def test_rippleedits_native_edit_is_the_prompt_without_its_new_target(ripple_native):
    edit = ripple_by_role(ripple_native, "edit")["rippleedits:0:edit"]
    assert (edit.prompt, edit.answer, edit.answer_before) == (
        "The name of the country of citizenship of Leonardo DiCaprio is", "Syria", "United States of America")


def test_rippleedits_native_edit_aliases_are_those_the_answers_give_the_new_target(ripple_native):
    entry = native_entries()[0]
    aliases = next(a["aliases"] for *_, q in native_queries(entry) for tid, a in zip(q["target_ids"], q["answers"])
                   if q["query_type"] == "regular" and tid == entry["edit"]["target_id"])
    assert ripple_by_role(ripple_native, "edit")["rippleedits:0:edit"].aliases == aliases


def test_rippleedits_native_original_asks_the_edit_prompt_for_the_previous_target(ripple_native):
    original = ripple_by_role(ripple_native, "original")["rippleedits:1:original"]
    assert (original.prompt, original.answer, original.counterfactual, original.edit_id) == (
        "The name of the mother of Kanye West is", "Donda West", "Geneviève Abelin", "rippleedits:1:edit")


def test_rippleedits_native_recent_edit_has_no_original_and_no_answer_before(ripple_native):
    edit = ripple_by_role(ripple_native, "edit")["rippleedits:2:edit"]
    assert ((edit.prompt, edit.answer, edit.answer_before), "rippleedits:2:original" in ripple_by_role(ripple_native, "original")) == (
        ("The place of birth of Sean Connery is", "Scotland", None), False)


def test_rippleedits_native_subject_is_named_where_an_answer_names_its_id(ripple_native):
    assert ripple_by_role(ripple_native, "edit")["rippleedits:1:edit"].triple.subject == "Kanye West"


def test_rippleedits_native_subject_stays_its_wikidata_id_where_no_answer_names_it(ripple_native):
    assert ripple_by_role(ripple_native, "edit")["rippleedits:0:edit"].triple.subject == "Q38111"


def test_rippleedits_native_two_hop_test_answers_with_its_second_hop(ripple_native):
    test = ripple_by_role(ripple_native, "test")["rippleedits:0:Compositionality_I.0.test0"]
    assert (test.prompt, test.answer, test.criterion) == (
        "The name of the capital city of the country of citizenship of Leonardo DiCaprio is", "Damascus", "Compositionality_I")


def test_rippleedits_native_test_with_two_answers_keeps_the_second_as_aliases(ripple_native):
    test = ripple_by_role(ripple_native, "test")["rippleedits:0:Relation_Specifity.1.test0"]
    assert (test.answer, {"film producer", "producer"} <= set(test.aliases)) == ("actor", True)


def test_rippleedits_native_test_links_to_the_first_answered_condition_of_its_test(ripple_native):
    conditions = ripple_by_role(ripple_native, "condition")
    expected, got = {}, {}
    for r, e in enumerate(native_entries()):
        for criterion, i, test, kind, q in native_queries(e):
            first = next(((c["prompt"], c["answers"][0]["value"]) for c in test["condition_queries"]
                          if c["answers"] and not mentioned(c["answers"][0]["value"], c["prompt"])), None)
            if kind == "test_queries" and q["answers"] and not mentioned(q["answers"][0]["value"], q["prompt"]):
                expected[(str(r), q["prompt"])] = first
    for p in ripple_by_role(ripple_native, "test").values():
        c = conditions.get(p.condition_id)
        got[(p.question_id, p.prompt)] = (c.prompt, c.answer) if c else None
    assert got == expected


def test_rippleedits_native_tests_and_conditions_link_to_their_entrys_edit(ripple_native):
    assert {p.edit_id for p in ripple_native.pieces if p.role.value != "edit"} == {
        p.id for p in ripple_native.pieces if p.role.value == "edit"}


def test_rippleedits_native_reads_the_loaders_relation_specificity_spelling(tmp_path, ripple_native):
    text = RIPPLE_NATIVE.read_text(encoding="utf-8").replace('"Relation_Specifity"', '"Relation_Specificity"')
    (tmp_path / "spelled.json").write_text(text, encoding="utf-8")
    assert download("rippleedits", tmp_path / "o", from_path=tmp_path / "spelled.json").pieces == ripple_native.pieces


@pytest.fixture
def ripple_url(tmp_path, monkeypatch, hf_cache):
    """rippleedits pointed at a local HTTP server holding the native fixture as ``v1/random.json``."""
    import dataclasses
    import functools
    import http.server
    import shutil
    import threading

    (tmp_path / "www" / "v1").mkdir(parents=True)
    shutil.copy(RIPPLE_NATIVE, tmp_path / "www" / "v1" / "random.json")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{{revision}}/{{split}}.json"
    monkeypatch.setitem(SOURCES, "rippleedits", dataclasses.replace(SOURCES["rippleedits"], url=url))
    yield url
    server.shutdown()


def test_rippleedits_split_names_the_subset_file_downloaded(tmp_path, ripple_url):
    res = download("rippleedits", tmp_path / "o", revision="v1", split="random")
    assert (res.meta.input["url"], res.meta.split) == (ripple_url.format(revision="v1", split="random"), "random")


def test_rippleedits_downloaded_subset_gives_the_local_files_pieces(tmp_path, ripple_url):
    local = download("rippleedits", tmp_path / "l", from_path=RIPPLE_NATIVE)
    assert download("rippleedits", tmp_path / "o", revision="v1", split="random").pieces == local.pieces


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


def test_a_plain_fact_without_a_kind_is_scored_as_written(plain):
    """It was wrapped in 'Question: ... Answer:' as a single-hop question."""
    fact = plain.pieces[1]  # "What is the capital of France?" / "Paris", no kind in the file
    assert fact.kind.value == "cloze" and fact.render() == ("What is the capital of France?", " Paris")
    assert plain.pieces[2].render()[0].startswith("Question: ")  # its file says multi_hop: a question


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_a_json_nan_answer_is_refused_or_skipped_and_counted_not_read_as_text(tmp_path, value):
    """A JSON NaN answer became the answer 'nan'."""
    path = tmp_path / "facts.jsonl"
    path.write_text(f'{{"prompt": "The sky is", "answer": {value}}}\n{{"prompt": "Grass is", "answer": "green"}}\n')
    with pytest.raises(DataError, match=rf"facts.jsonl:1: field 'answer': expected a string, got {value.lower()[:3]}"):
        download(None, tmp_path / "a", from_path=path)
    res = download(None, tmp_path / "b", from_path=path, skip_bad=True)
    assert [p.answer for p in res.pieces] == ["green"] and res.meta.records_skipped == {"not a string: answer": 1}


def test_plain_piece_reads_its_triple(plain):
    assert plain.pieces[3].triple.object == "Bram Stoker"


def test_plain_pieces_count_leaking_pieces(plain):
    assert plain.meta.pieces_skipped == {"answer appears in its own prompt": 1}


def test_written_pieces_file_reads_back_unchanged(tmp_path, plain):
    assert download(None, tmp_path, from_path=plain.pieces_path, format="pieces").pieces == plain.pieces


@pytest.mark.parametrize("name", ["mquake", "rippleedits"])
def test_benchmark_pieces_read_back_unchanged_as_a_plain_pieces_file(tmp_path, converted, name):
    assert download(None, tmp_path, from_path=converted[name].pieces_path, format="pieces").pieces == converted[name].pieces


def test_plain_piece_with_an_unknown_role_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "The capital of France is", "answer": "Paris", "role": "probe"}])
    with pytest.raises(DataError, match=r"r\.jsonl:1: field 'role': expected one of edit, original, test, condition"):
        download(None, tmp_path / "o", from_path=path)


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
