"""gradcouple.datasets: every format parsed from the real shared samples (or a schema-faithful
fixture), counted independently of the parsers, plus the Hub path via local dataset
directories and every kind of bad input."""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from gradcouple.datasets import (
    ALIASES,
    FORMATS,
    SOURCES,
    download,
    list_sources,
    resolve_source,
    sample_files,
    sample_path,
    sniff_format,
)
from gradcouple.datasets._common import RELATION_TEMPLATES, normalize_relation, relation_question
from gradcouple.errors import DataError, NetworkError
from gradcouple.pieces import read_pieces

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared sample data not found at {SHARED}")

FILES = {
    "hotpotqa": "hotpotqa_dev_distractor.sample.jsonl",
    "musique": "musique_ans_dev.sample.jsonl",
    "musique-flashrag": "musique_dev.flashrag.sample.jsonl",
    "2wikimultihopqa": "2wikimultihopqa_dev.sample.jsonl",
    "wikihop": "wikihop_dev.sample.jsonl",
    "bamboogle": "bamboogle_test.sample.jsonl",
    "mquake": "mquake_hard.sample.jsonl",
}
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


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (SHARED / FILES[name]).read_text(encoding="utf-8").splitlines() if line.strip()]


def mentioned(answer: str, prompt: str) -> bool:
    """Independent leak check: the answer as a whole word, case-insensitively."""
    return re.search(rf"(?<!\w){re.escape(answer.casefold())}(?!\w)", prompt.casefold()) is not None


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """Each full shared sample converted once (records skipped must be none)."""
    if not SHARED.is_dir():
        pytest.skip(f"shared sample data not found at {SHARED}")
    out = {}
    for name, fname in FILES.items():
        source = "musique" if name == "musique-flashrag" else name
        out[name] = download(source, tmp_path_factory.mktemp(name), from_path=SHARED / fname)
    return out


# ----------------------------------------------------------------------------- registry


def test_registry_names_aliases_and_rows():
    assert {"hotpotqa", "hotpotqa-fullwiki", "musique", "2wikimultihopqa", "wikihop", "bamboogle", "mquake",
            "mquake-cf-3k", "mquake-cf-3k-v2", "mquake-t", "pieces"} <= set(SOURCES)
    assert resolve_source("hotpotqa-distractor").name == "hotpotqa"
    assert resolve_source("2WIKI").name == "2wikimultihopqa"
    assert all(resolve_source(a).name == n for a, n in ALIASES.items())
    rows = list_sources()
    assert [r["name"] for r in rows] == list(SOURCES)
    for r in rows:
        assert {"name", "hub", "splits", "license", "size", "default_split"} <= set(r)
        if r["name"] != "pieces":
            assert r["default_split"] in r["splits"] and r["license"] and r["hub"]
    assert SOURCES["hotpotqa"].hub_config == "distractor" and SOURCES["hotpotqa-fullwiki"].hub_config == "fullwiki"
    with pytest.raises(DataError, match="unknown dataset 'nope'.*musique"):
        resolve_source("nope")


def test_bundled_samples_are_the_first_12_records():
    assert sample_path("2wiki").name == "2wikimultihopqa_dev.sample.jsonl"
    with pytest.raises(DataError, match="no bundled sample"):
        sample_path("hotpotqa-fullwiki")
    notice = (Path(sample_path("musique")).parents[2] / "NOTICE").read_text(encoding="utf-8")
    for fname in FILES.values():
        assert fname in sample_files() and fname in notice
        lines = sample_path(fname).read_text(encoding="utf-8").splitlines()
        assert len(lines) == 12
        if SHARED.is_dir():
            assert lines == (SHARED / fname).read_text(encoding="utf-8").splitlines()[:12]


def test_sample_download_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = download("musique", tmp_path, from_path="sample")
    assert res.records_read == 12 and res.meta["input"]["kind"] == "sample"
    assert read_pieces(res.pieces_path) == res.pieces
    flash = download("musique", tmp_path / "f", from_path="sample:musique_dev.flashrag.sample.jsonl")
    assert flash.records_read == 12 and flash.pieces_per_kind["multi_hop"] == 12


# ----------------------------------------------------------------------------- every shared sample


@needs_shared
@pytest.mark.parametrize("name", list(FILES))
def test_shared_sample_converts_without_unexplained_skips(converted, name):
    res = converted[name]
    n = len(records(name))
    assert res.records_read == n and res.records_used == n and res.records_skipped == {}
    assert set(res.pieces_skipped) <= KNOWN_PIECE_SKIPS
    meta = json.loads(res.meta_path.read_text())
    assert meta["records_read"] == n and meta["input"]["sha256"] and meta["package_version"]
    pieces = read_pieces(res.pieces_path)
    assert len({(p.prompt, p.answer) for p in pieces}) == len(pieces) == meta["pieces_made"]
    assert Counter(p.kind.value for p in pieces) == Counter(meta["pieces_per_kind"])
    for p in pieces:
        assert not mentioned(p.answer, p.prompt), p.id
        assert not re.search(r"#\d", p.prompt) and ">>" not in p.prompt, p.id
        assert p.prompt == p.prompt.strip() and p.answer == p.answer.strip() and "\n" not in p.answer
        assert p.owners[0] == p.question_id
        record, hop = p.id.split(":")[1:]
        assert p.id == f"{p.dataset}:{record}:{hop}" and record == p.question_id
        assert (hop == "q") == (p.hop is None) == (p.kind.value == "multi_hop")
    # sniffing the format from the first record's keys finds the same parser
    assert sniff_format(records(name)[0]) == ("musique" if name == "musique-flashrag" else name)


@needs_shared
def test_ids_are_stable_across_runs(tmp_path):
    for name in ("hotpotqa", "mquake", "musique"):
        a = download(name, tmp_path / "a" / name, from_path=SHARED / FILES[name])
        b = download(None, tmp_path / "b" / name, from_path=SHARED / FILES[name], format=name)
        assert a.pieces_path.read_bytes() == b.pieces_path.read_bytes()


@needs_shared
@pytest.mark.parametrize("name", ["musique", "musique-flashrag"])
def test_musique_steps_refs_and_dedup_owners(converted, name):
    res, recs = converted[name], records(name)
    by_id = {p.id: p for p in res.pieces}
    steps = [(r, k, s) for r in recs for k, s in enumerate(r.get("question_decomposition") or r["metadata"]["question_decomposition"])]
    # every decomposition step is a piece of its own, or merged into an identical one it co-owns
    merged = res.meta["pieces_merged_as_duplicates"].get("single_hop", 0)
    assert res.pieces_per_kind["single_hop"] + merged == len(steps)
    assert res.pieces_per_kind["multi_hop"] == len(recs)
    owners_of = defaultdict(list)
    for r, k, s in steps:
        p = by_id.get(f"musique:{r['id']}:{k}")
        if p is None:
            p = next(q for q in res.pieces if r["id"] in q.owners and q.kind.value == "single_hop" and q.answer == s["answer"].strip())
        assert p.answer == s["answer"].strip()
        for j in map(int, re.findall(r"#(\d+)", s["question"])):
            prev = steps[[i for i, (rr, kk, _) in enumerate(steps) if rr is r and kk == j - 1][0]][2]
            assert prev["answer"].strip() in p.prompt
        if ">>" in s["question"]:
            rel = s["question"].split(">>")[1].strip()
            assert p.triple is not None and p.triple.relation == rel and p.triple.object == s["answer"].strip()
        if "#" not in s["question"]:  # same text, same answer: one piece, co-owned
            owners_of[(s["question"].strip(), s["answer"].strip())].append(f"musique:{r['id']}:{k}")
    shared = {key: ids for key, ids in owners_of.items() if len(ids) > 1}
    assert shared, "the sample has single-hop questions shared by several multi-hop questions"
    for ids in shared.values():
        kept = by_id[ids[0]]
        assert [i.split(":")[1] for i in ids] == [o for o in kept.owners if f"musique:{o}:" in " ".join(ids)]
        assert not any(i in by_id for i in ids[1:])


@needs_shared
def test_musique_known_records(converted):
    by_id = {p.id: p for p in converted["musique-flashrag"].pieces}
    p0, p1 = by_id["musique:dev_0:0"], by_id["musique:dev_0:1"]
    assert (p0.prompt, p0.answer) == ("Who is the performer of Green?", "Steve Hillage")
    assert (p1.prompt, p1.answer) == ("Who is the spouse of Steve Hillage?", "Miquette Giraudy")
    assert p1.support.startswith("Miquette Giraudy (born 9 February 1953")
    q = by_id["musique:dev_0:q"]
    assert (q.prompt, q.answer, q.hop) == ("Who is the spouse of the Green performer?", "Miquette Giraudy", None)
    native = {p.id: p for p in converted["musique"].pieces}
    assert native["musique:2hop__799936_20273:1"].prompt == "What year did John Knox past away?"


def test_relation_templates_cover_the_samples():
    if SHARED.is_dir():
        rels = {s["question"].split(">>")[1].strip() for n in ("musique", "musique-flashrag") for r in records(n)
                for s in (r.get("question_decomposition") or r["metadata"]["question_decomposition"]) if ">>" in s["question"]}
        rels |= {e[1] for r in records("2wikimultihopqa") for e in r["evidences"]}
        rels |= {r["query"].split(" ")[0].replace("_", " ") for r in records("wikihop")}
        assert {r for r in rels if normalize_relation(r) not in RELATION_TEMPLATES} == set()
    assert relation_question("Hey Jude", "author") == "Who is the author of Hey Jude?"
    assert relation_question("Paris", "located_in_the_administrative_territorial_entity") == \
        "In which administrative territorial entity is Paris located?"
    assert relation_question("Rusalka", "number of acts") == "What is the number of acts of Rusalka?"


@needs_shared
def test_hotpotqa_clozes(converted):
    res, recs = converted["hotpotqa"], records("hotpotqa")
    n_facts = sum(len(r["supporting_facts"]) for r in recs)
    # every supporting fact and every question is a piece or a counted skip
    assert res.pieces_per_kind["cloze"] + res.pieces_per_kind["multi_hop"] + sum(res.pieces_skipped.values()) == n_facts + len(recs)
    by_rec = {r["_id"]: r for r in recs}
    for p in res.pieces:
        r = by_rec[p.question_id]
        if p.kind.value != "cloze":
            assert p.prompt == " ".join(r["question"].split())
            continue
        title, idx = r["supporting_facts"][p.hop]
        sentence = " ".join(dict((t, s) for t, s in r["context"])[title][idx].split())
        assert p.support == sentence
        assert sentence.startswith(p.prompt) and p.answer in sentence[len(p.prompt):]
        assert len(p.prompt.split()) >= 3 and p.answer.lower() not in ("yes", "no")
    by_id = {p.id: p for p in res.pieces}
    kiss = by_id["hotpotqa:5a8c7595554299585d9e36b6:0"]
    assert kiss.prompt.endswith("starring then 17-year-old") and kiss.answer == "Shirley Temple"  # bridge entity
    assert by_id["hotpotqa:5a8c7595554299585d9e36b6:2"].answer == "Chief of Protocol"
    # yes/no comparison: no clozes, only the question
    assert [p.id for p in res.pieces if p.question_id == "5a8b57f25542995d1e6f1371"] == ["hotpotqa:5a8b57f25542995d1e6f1371:q"]


def _layout_records() -> tuple[list, list]:
    native = json.loads((FIXTURES / "hotpotqa_native_array.json").read_text(encoding="utf-8"))
    hub = json.loads((FIXTURES / "hotpotqa_hub_layout.json").read_text(encoding="utf-8"))
    return native, hub


def test_hotpotqa_native_array_fixture(tmp_path):
    res = download(None, tmp_path, from_path=FIXTURES / "hotpotqa_native_array.json")
    assert res.meta["format"] == "hotpotqa"
    got = [(p.id, p.prompt, p.answer) for p in res.pieces]
    assert got == [
        ("hotpotqa:fx000000000000000000bridge:0", "Rusalka, Op. 114, is a lyric fairy tale opera by", "Antonín Dvořák"),
        ("hotpotqa:fx000000000000000000bridge:1", "Dvořák was born in", "Nelahozeves"),
        ("hotpotqa:fx000000000000000000bridge:q", "In which village was the composer of the opera Rusalka born?", "Nelahozeves"),
        ("hotpotqa:fx0000000000000000comparison:q", "Are the Vltava and the Elbe both rivers of Central Europe?", "yes"),
    ]
    assert res.pieces_skipped == {"supporting fact points past the paragraph's last sentence": 1,
                                  "yes/no answer: no answer span in the supporting sentence": 2}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets library's cache (and any Hub lookup) inside tmp_path."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    return tmp_path


def test_hub_path_with_local_parquet_dir_and_save_to_disk(tmp_path, hf_cache):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    native, hub = _layout_records()
    expected = [(p.id, p.prompt, p.answer, p.support) for p in download(None, tmp_path / "n", from_path=FIXTURES / "hotpotqa_native_array.json").pieces]
    # Hub layout (dicts of parallel lists) as the Hub stores it: <config>/<split>-*.parquet
    (tmp_path / "repo" / "distractor").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(hub), tmp_path / "repo" / "distractor" / "validation-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(hub[:1]), tmp_path / "repo" / "distractor" / "train-00000-of-00001.parquet")
    res = download("hotpotqa", tmp_path / "h", from_path=tmp_path / "repo")
    assert [(p.id, p.prompt, p.answer, p.support) for p in res.pieces] == expected
    assert res.meta["input"]["kind"] == "dataset_dir" and res.meta["split"] == "validation"
    assert download("hotpotqa", tmp_path / "t", from_path=tmp_path / "repo", split="train").records_read == 1
    with pytest.raises(DataError, match="no split 'test'; it has"):
        download("hotpotqa", tmp_path / "x", from_path=tmp_path / "repo", split="test")
    # a `save_to_disk` directory
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(hub)}).save_to_disk(str(tmp_path / "saved"))
    res = download("hotpotqa", tmp_path / "s", from_path=tmp_path / "saved")
    assert [(p.id, p.prompt, p.answer, p.support) for p in res.pieces] == expected
    # a single parquet file in the Hub layout, format sniffed
    res = download(None, tmp_path / "p", from_path=tmp_path / "repo" / "distractor" / "validation-00000-of-00001.parquet")
    assert res.meta["format"] == "hotpotqa" and len(res.pieces) == len(expected)


def test_offline_fails_fast_with_a_way_out(tmp_path, monkeypatch, hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    with pytest.raises(NetworkError) as e:
        download("hotpotqa", tmp_path / "o")
    assert time.monotonic() - t < 10
    assert "--from PATH" in str(e.value) and "--sample" in str(e.value)
    assert not (tmp_path / "o" / "pieces.jsonl").exists()


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch, hf_cache):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t = time.monotonic()
    with pytest.raises(NetworkError, match=r"unreachable.*--from PATH.*--sample"):
        download("2wiki", tmp_path / "o")
    assert time.monotonic() - t < 10


def test_files_outside_the_hub_are_fetched_once_into_the_hf_cache(tmp_path, monkeypatch, hf_cache):
    import dataclasses
    import functools
    import http.server
    import shutil
    import threading

    from gradcouple.datasets import SOURCES

    (tmp_path / "www" / "v1").mkdir(parents=True)
    shutil.copy(FIXTURES / "mquake_t.json", tmp_path / "www" / "v1" / "MQuAKE-T.json")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{{revision}}/MQuAKE-T.json"
        monkeypatch.setitem(SOURCES, "mquake-t", dataclasses.replace(SOURCES["mquake-t"], url=url))
        res = download("mquake-t", tmp_path / "o", revision="v1")
        assert res.meta["input"]["kind"] == "url" and res.meta["input"]["sha256"] and len(res.pieces) == 6
        assert Path(res.meta["input"]["path"]).is_relative_to(tmp_path / "hf-datasets")
        with pytest.raises(DataError, match="HTTP 404"):
            download("mquake-t", tmp_path / "o", revision="v2")
    finally:
        server.shutdown()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cached copy is used offline
    assert download("mquake-t", tmp_path / "o2", revision="v1").pieces == res.pieces


@needs_shared
def test_twowiki_triples(converted):
    res, recs = converted["2wikimultihopqa"], records("2wikimultihopqa")
    n_ev = sum(len(r["evidences"]) for r in recs)
    assert res.pieces_per_kind["single_hop"] + res.pieces_per_kind["multi_hop"] + sum(res.pieces_skipped.values()) \
        + sum(res.meta["pieces_merged_as_duplicates"].values()) == n_ev + len(recs)
    by_id = {p.id: p for p in res.pieces}
    for r in recs:
        for k, (s, rel, o) in enumerate(r["evidences"]):
            p = by_id[f"2wikimultihopqa:{r['_id']}:{k}"]
            assert (p.triple.subject, p.triple.relation, p.triple.object) == (s, rel, o) and p.answer == o
            assert s in p.prompt
    first = by_id["2wikimultihopqa:02ae4663095611ebbdaeac1f6bf848b6:0"]
    assert first.prompt == "When was Enemmy published?" and first.support.startswith("Enemmy is a 2013 Indian")


@needs_shared
def test_wikihop_and_bamboogle(converted):
    wh = {p.id: p for p in converted["wikihop"].pieces}
    p = wh["wikihop:WH_dev_0:q"]
    assert (p.triple.subject, p.triple.relation, p.answer) == ("sms braunschweig", "country", "german empire")
    assert wh["wikihop:WH_dev_5:q"].prompt == "Where was gregorio di cecco born?"
    assert len(wh) == len(records("wikihop"))
    bam = {p.id: p for p in converted["bamboogle"].pieces}
    assert len(bam) == len(records("bamboogle"))
    assert bam["bamboogle:test_74:q"].answer == "George VI"
    assert bam["bamboogle:test_0:q"].prompt == "Who was president of the United States in the year that Citibank was founded?"


@needs_shared
def test_mquake_counterfactuals(converted):
    res, recs = converted["mquake"], records("mquake")
    by_key = {(p.prompt, p.answer): p for p in res.pieces}
    n_rewrites = n_found = 0
    for r in recs:
        for rw in r["requested_rewrite"]:
            n_rewrites += 1
            prompt, true, new = rw["prompt"].format(rw["subject"]), rw["target_true"]["str"], rw["target_new"]["str"]
            if mentioned(true, prompt):  # "Miguel I of Portugal is a citizen of" -> Portugal
                continue
            p = by_key[(prompt, true)]
            assert p.counterfactual == new and str(r["case_id"]) in p.owners
            n_found += 1
        for k, hop in enumerate(r["single_hops"]):
            p = by_key[(hop["cloze"], hop["answer"])]
            assert p.kind.value == "cloze"
            norm = lambda xs: {" ".join(x.split()).casefold() for x in xs}  # noqa: E731
            assert norm(hop["answer_alias"]) - norm([hop["answer"]]) <= norm(p.aliases)
        q = next(p for p in res.pieces if p.id == f"mquake:{r['case_id']}:q")
        assert (q.prompt, q.answer, q.counterfactual) == (r["questions"][0], r["answer"], r["new_answer"])
    assert n_found == n_rewrites - res.pieces_skipped.get("answer appears in its own prompt", 0) > 100
    assert res.meta["counterfactual_conflicts_first_kept"] == 0


def test_mquake_t_fixture(tmp_path):
    res = download("mquake-t", tmp_path, from_path=FIXTURES / "mquake_t.json")
    by_id = {p.id: p for p in res.pieces}
    assert by_id["mquake-t:1:1"].counterfactual == "Rishi Sunak"  # matched by the rewrite's cloze
    assert by_id["mquake-t:2:0"].counterfactual == "Canada"  # cloze differs: matched by Wikidata triple
    assert by_id["mquake-t:1:0"].counterfactual is None
    assert by_id["mquake-t:1:q"].counterfactual == "Rishi Sunak" and "Theresa May" in by_id["mquake-t:1:q"].aliases
    assert by_id["mquake-t:2:1"].triple.relation == "capital"
    assert len(res.pieces) == 6


def test_plain_pieces_file(tmp_path):
    res = download(None, tmp_path, from_path=FIXTURES / "plain_pieces.jsonl")
    assert res.meta["format"] == "pieces"
    ids = [p.id for p in res.pieces]
    assert ids == ["mine:paris:0", "mine:paris:1", "mine:paris:q", "pieces:3:0"]
    assert res.pieces[0].counterfactual == "Rome" and res.pieces[0].kind.value == "cloze"
    assert res.pieces[3].triple.object == "Bram Stoker"
    assert res.pieces_skipped == {"answer appears in its own prompt": 1}
    # a written pieces.jsonl reads back as a plain pieces file, unchanged
    again = download(None, tmp_path / "again", from_path=res.pieces_path, format="pieces")
    assert again.pieces == res.pieces


# ----------------------------------------------------------------------------- bad input


def _musique_line(**changes) -> dict:
    rec = {"id": "2hop__1_2", "question": "Who is the spouse of the Green performer?", "answer": "Miquette Giraudy",
           "answer_aliases": [], "answerable": True, "paragraphs": [],
           "question_decomposition": [{"id": 1, "question": "Green >> performer", "answer": "Steve Hillage", "paragraph_support_idx": None},
                                      {"id": 2, "question": "#1 >> spouse", "answer": "Miquette Giraudy", "paragraph_support_idx": None}]}
    rec.update(changes)
    return rec


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "rows, pattern",
    [
        ([_musique_line(), '{"id": "x", "question": '], r"bad\.jsonl:2: not valid JSON"),
        ([_musique_line(), _musique_line(id="b", question_decomposition=[{"question": "Green >> performer"}])],
         r"bad\.jsonl:2: field 'question_decomposition\[0\]\.answer': missing"),
        ([_musique_line(), _musique_line(id="b", answer="  ")], r"bad\.jsonl:2: field 'answer': empty"),
        ([_musique_line(), _musique_line(id="2hop__3_4", question_decomposition=[{"question": "#2 >> spouse", "answer": "A"}])],
         r"bad\.jsonl:2: field 'question_decomposition\[0\]\.question': refers to #2"),
        ([_musique_line(), {"case_id": 1, "requested_rewrite": [], "single_hops": []}], r"bad\.jsonl:2: mixed formats: .*mquake"),
        ([_musique_line(), [1, 2]], r"bad\.jsonl:2: expected a JSON object, got list"),
    ],
    ids=["malformed-json", "missing-field", "empty-answer", "forward-reference", "mixed-formats", "not-an-object"],
)
def test_bad_records_are_located_and_never_half_written(tmp_path, rows, pattern):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pieces.jsonl").write_text("OLD\n")
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=pattern) as e:
        download("musique", out, from_path=path)
    assert "--skip-bad" in str(e.value)
    assert (out / "pieces.jsonl").read_text() == "OLD\n" and not (out / "download.json").exists()
    res = download("musique", out, from_path=path, skip_bad=True)
    assert sum(res.records_skipped.values()) == len(rows) - 1 and res.records_used == 1


def test_skip_bad_counts_by_reason(tmp_path):
    rows = [_musique_line(), '{"broken', _musique_line(id="b", answer=""), _musique_line(id="c", answerable=False),
            _musique_line(id="d", question_decomposition=[{"question": "x"}]), _musique_line(id="e", question_decomposition=[{"question": "y"}])]
    res = download("musique", tmp_path / "o", from_path=_write_jsonl(tmp_path / "in.jsonl", rows), skip_bad=True)
    assert res.records_read == 6 and res.records_used == 1
    assert res.records_skipped == {"not valid JSON": 1, "empty: answer": 1, "unanswerable (answerable: false)": 1,
                                   "missing: question_decomposition[].answer": 2}
    assert json.loads(res.meta_path.read_text())["records_skipped"] == res.records_skipped


def test_unanswerable_musique_is_counted_even_without_skip_bad(tmp_path):
    rows = [_musique_line(), _musique_line(id="u", answerable=False)]
    res = download("musique-full", tmp_path, from_path=_write_jsonl(tmp_path / "full.jsonl", rows))
    assert res.records_skipped == {"unanswerable (answerable: false)": 1} and res.records_used == 1


def test_array_and_parquet_errors_name_the_record(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = _musique_line(id="zz", question="")
    (tmp_path / "a.json").write_text(json.dumps({"data": [_musique_line(), bad]}))
    with pytest.raises(DataError, match=r"a\.json record 2: field 'question': empty"):
        download(None, tmp_path / "o", from_path=tmp_path / "a.json")
    (tmp_path / "broken.json").write_text('[{"id": 1},\n {"id": }]')
    with pytest.raises(DataError, match=r"broken\.json:2: not valid JSON"):
        download(None, tmp_path / "o", from_path=tmp_path / "broken.json")
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"obj\.json: a JSON object must hold its records in a 'data' list"):
        download(None, tmp_path / "o", from_path=tmp_path / "obj.json")
    pq.write_table(pa.Table.from_pylist([{"id": "t1", "question": "Q?", "golden_answers": ["A"]},
                                         {"id": "t2", "question": "R?", "golden_answers": []}]), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet record 2: field 'golden_answers': empty answer list"):
        download("bamboogle", tmp_path / "o", from_path=tmp_path / "b.parquet")


def test_unknown_and_conflicting_formats(tmp_path):
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(DataError, match=r"odd\.jsonl:1: unknown record format \(keys: foo, bar\); pass --format"):
        download(None, tmp_path / "o", from_path=path)
    with pytest.raises(DataError, match=r"odd\.jsonl:1: field 'question': missing"):
        download(None, tmp_path / "o", from_path=path, format="bamboogle")
    with pytest.raises(DataError, match="unknown format 'csv'"):
        download(None, tmp_path / "o", from_path=path, format="csv")
    with pytest.raises(DataError, match="does not match musique"):
        download("musique", tmp_path / "o", from_path=path, format="hotpotqa")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        download(None, tmp_path / "o", from_path=tmp_path / "x.csv")
    with pytest.raises(DataError, match="no such file"):
        download(None, tmp_path / "o", from_path=tmp_path / "missing.jsonl")


def test_no_pieces_is_an_error_not_an_empty_file(tmp_path):
    path = _write_jsonl(tmp_path / "leak.jsonl", [{"prompt": "Paris is the capital of France, Paris", "answer": "Paris"}])
    with pytest.raises(DataError, match="no knowledge pieces made"):
        download(None, tmp_path / "o", from_path=path)
    assert not (tmp_path / "o" / "pieces.jsonl").exists()


def test_formats_are_the_parsers():
    assert set(FORMATS) == {"hotpotqa", "musique", "2wikimultihopqa", "wikihop", "bamboogle", "mquake", "pieces"}
