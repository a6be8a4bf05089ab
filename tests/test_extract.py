"""The extract and couple stages end to end on a real tokenizer, against the autograd oracle."""

from __future__ import annotations

import json

import pytest
import torch

from gradcouple.config import RunConfig
from gradcouple.couple import couple, load_cosine
from gradcouple.errors import ConfigError
from gradcouple.extract import encode_pieces, extract
from gradcouple.layers import select_targets
from gradcouple.pieces import read_pieces
from gradcouple.store import ShardWriter

from conftest import write_fact_pieces
from oracle import cosine_from_gram, oracle_gram


def _cfg(pieces_path, **extract_kw) -> RunConfig:
    cfg = RunConfig()
    cfg.data.pieces = pieces_path
    cfg.model.name = "llama-tiny-random"
    cfg.model.layers = "all"
    for k, v in {"batch_size": 3, "shard_size": 4, **extract_kw}.items():
        setattr(cfg.extract, k, v)
    return cfg


def test_extract_couple_match_oracle(tmp_path, tiny_llama_loaded):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    res = extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    assert res.n_pieces == 10 and res.n_shards == 3
    couple(cfg, tmp_path / "run", show_progress=False)
    ids, cos = load_cosine(tmp_path / "run")
    pieces = read_pieces(tmp_path / "p.jsonl")
    assert ids == [p.id for p in pieces]
    encoded = encode_pieces(tiny_llama_loaded.tokenizer, pieces, cfg)
    targets = select_targets(tiny_llama_loaded.model, "all")
    ref, ref_lp = oracle_gram(tiny_llama_loaded.model, targets, encoded)
    assert (cos - cosine_from_gram(ref)).abs().max().item() < 2e-3
    man = json.loads((tmp_path / "run/gradients/manifest.json").read_text())
    assert man["complete"] and man["n_params"] == sum(t.n_params for t in targets)
    lp = torch.tensor([m["logprob"] for m in man["pieces"]], dtype=torch.float64)
    assert torch.allclose(lp, torch.tensor(ref_lp, dtype=torch.float64), atol=1e-4)
    sq = torch.tensor([sum(m["sq_norm"].values()) for m in man["pieces"]], dtype=torch.float64)
    assert torch.allclose(sq, ref.diagonal(), rtol=1e-5)
    first = man["pieces"][0]
    assert first["prompt"] == "Question: Who wrote Hamlet?\nAnswer:" and first["answer"] == " William Shakespeare"
    assert first["n_prompt_tokens"] + first["n_answer_tokens"] == first["n_inputs"] + 1
    stats = json.loads((tmp_path / "run/coupling/stats.json").read_text())
    assert stats["same_question"]["pairs"] == 3 + 3 + 1 + 1  # q1, q2: 3 pieces each; q3, q4: 2 each
    assert stats["same_question"]["pairs"] + stats["cross_question"]["pairs"] == 45
    # Paris (q2, q3) and Stratford-upon-Avon, the Seine (q1, q2 hop and question): 3 same-answer pairs
    assert stats["same_answer"]["pairs"] == 3 and stats["different_answer"]["pairs"] == 42
    assert stats["same_question_different_answer"]["pairs"] == 8 - 2
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run/coupling/pairs_different_answer.csv", encoding="utf-8")))
    assert len(rows) == 42 and all(r["answer_a"].lower() != r["answer_b"].lower() for r in rows)
    assert [float(r["cosine"]) for r in rows] == sorted((float(r["cosine"]) for r in rows), reverse=True)

def test_interrupted_extract_resumes(tmp_path, tiny_llama_loaded, monkeypatch):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    clean = extract(cfg, tmp_path / "clean", loaded=tiny_llama_loaded, show_progress=False)
    real_flush = ShardWriter.flush
    calls = {"n": 0}

    def flaky_flush(self, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_flush(self, path)

    monkeypatch.setattr(ShardWriter, "flush", flaky_flush)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    monkeypatch.setattr(ShardWriter, "flush", real_flush)
    man = json.loads((tmp_path / "run/gradients/manifest.json").read_text())
    assert not man["complete"] and len(man["shards"]) == 1
    assert not list((tmp_path / "run/gradients").glob("*.tmp"))
    res = extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    assert res.resumed_shards == 1 and res.n_shards == clean.n_shards
    a = json.loads((tmp_path / "run/gradients/manifest.json").read_text())
    b = json.loads((tmp_path / "clean/gradients/manifest.json").read_text())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_extract_refuses_other_config_without_overwrite(tmp_path, tiny_llama_loaded):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    cfg.model.layers = "last2"
    with pytest.raises(ConfigError, match=r"model\.layers: 'all' -> 'last2'.*--overwrite"):
        extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    res = extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, overwrite=True, show_progress=False)
    assert res.resumed_shards == 0


@pytest.mark.parametrize("store", ["dense", "projected"])
def test_other_stores_run_end_to_end(tmp_path, tiny_llama_loaded, store):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl", store=store, proj_dim=8)
    extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    couple(cfg, tmp_path / "run", show_progress=False)
    _, cos = load_cosine(tmp_path / "run")
    assert torch.allclose(cos.diagonal(), torch.ones(10, dtype=torch.float64), atol=1e-6)
