"""The extract and couple stages end to end on a tokenizer, against the autograd oracle."""

from __future__ import annotations

import pytest
import torch
from conftest import write_fact_pieces
from oracle import cosine_from_gram, oracle_gram

from gradcouple.config import RunConfig
from gradcouple.stages.couple import couple
from gradcouple.errors import ConfigError
from gradcouple.scoring import encode_pieces
from gradcouple.stages.extract import extract
from gradcouple.layers import select_targets
from gradcouple.pieces import read_pieces
from gradcouple.rundir import RunDir
from gradcouple.stores import ShardWriter

COS_ATOL_FP16 = 2e-3   # cosines from fp16 shards vs the float64 oracle
LOGPROB_ATOL = 1e-4    # nats
SQ_NORM_RTOL = 1e-5    # squared norms are accumulated in float64 from float32 factors
UNIT_DIAGONAL_ATOL = 1e-12


def _cfg(pieces_path, **extract_kw) -> RunConfig:
    cfg = RunConfig()
    cfg.data.pieces = pieces_path
    cfg.model.name = "llama-tiny-random"
    cfg.model.layers = "all"
    for k, v in {"batch_size": 3, "shard_size": 4, **extract_kw}.items():
        setattr(cfg.extract, k, v)
    return cfg


@pytest.fixture
def extracted(tmp_path, tiny_llama_loaded):
    """A run of the ten hand-written facts: (cfg, RunDir, oracle Gram, oracle log-probs)."""
    pieces = write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    couple(cfg, tmp_path / "run", show_progress=False)
    encoded = encode_pieces(tiny_llama_loaded.tokenizer, pieces, cfg.data.prompt_template, cfg.extract.max_length)
    ref, ref_lp = oracle_gram(tiny_llama_loaded.model, select_targets(tiny_llama_loaded.model, "all"), encoded)
    return cfg, RunDir(tmp_path / "run"), ref, ref_lp


def test_cosines_from_the_shards_match_the_oracle(extracted):
    _, run, ref, _ = extracted
    _, cos = run.coupling.load_cosine()
    assert (cos - cosine_from_gram(ref)).abs().max().item() < COS_ATOL_FP16


def test_cosine_matrix_is_in_pieces_file_order(extracted):
    _, run, _, _ = extracted
    ids, _ = run.coupling.load_cosine()
    assert ids == [p.id for p in read_pieces(run.pieces_path)]


def test_manifest_log_probs_match_the_oracle(extracted):
    _, run, _, ref_lp = extracted
    lp = torch.tensor([r.logprob for r in run.gradients.load_manifest().records()], dtype=torch.float64)
    assert torch.allclose(lp, torch.tensor(ref_lp, dtype=torch.float64), atol=LOGPROB_ATOL)


def test_manifest_squared_norms_match_the_oracle_diagonal(extracted):
    _, run, ref, _ = extracted
    sq = torch.tensor([sum(r.sq_norm.values()) for r in run.gradients.load_manifest().records()], dtype=torch.float64)
    assert torch.allclose(sq, ref.diagonal(), rtol=SQ_NORM_RTOL)


def test_manifest_counts_every_target_parameter(extracted, tiny_llama_loaded):
    _, run, _, _ = extracted
    assert run.gradients.load_manifest().n_params == sum(t.n_params for t in select_targets(tiny_llama_loaded.model, "all"))


def test_manifest_records_the_exact_scored_strings(extracted):
    _, run, _, _ = extracted
    first = run.gradients.load_manifest().records()[0]
    assert first.prompt == "Question: Who wrote Hamlet?\nAnswer:" and first.answer == " William Shakespeare"
    assert first.n_prompt_tokens + first.n_answer_tokens == first.n_inputs + 1


def test_pair_statistics_split_by_question_and_answer(extracted):
    _, run, _, _ = extracted
    p = run.coupling.load_stats().pairs
    assert p.same_question.n == 3 + 3 + 1 + 1  # q1, q2: 3 pieces each; q3, q4: 2 each
    assert p.same_question.n + p.cross_question.n == 45
    # Paris (q2, q3), Stratford-upon-Avon and the Seine (a hop and its question): 3 same-answer pairs
    assert p.same_answer.n == 3 and p.different_answer.n == 42
    assert p.same_question_different_answer.n == 8 - 2


def test_different_answer_pairs_are_sorted_and_differ(extracted):
    _, run, _, _ = extracted
    rows = run.coupling.load_pairs(different_answer=True)
    assert len(rows) == 42 and all(r.answer_a.strip().lower() != r.answer_b.strip().lower() for r in rows)
    assert [r.cosine for r in rows] == sorted((r.cosine for r in rows), reverse=True)


def test_gradsim_matrix_is_exactly_symmetric(extracted):
    _, run, _, _ = extracted
    _, cos = run.coupling.load_cosine()
    assert torch.equal(cos, cos.t())


def test_interrupted_extract_resumes_bit_for_bit(tmp_path, tiny_llama_loaded, monkeypatch):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    clean = extract(cfg, tmp_path / "clean", loaded=tiny_llama_loaded, show_progress=False)
    real_write, calls = ShardWriter.write, {"n": 0}

    def flaky_write(self, path, taken):  # on the shard-writing thread: the interrupt reaches extract()
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_write(self, path, taken)

    monkeypatch.setattr(ShardWriter, "write", flaky_write)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    monkeypatch.setattr(ShardWriter, "write", real_write)
    partial = RunDir(tmp_path / "run").gradients.load_manifest(complete=False)
    assert not partial.complete and len(partial.shards) == 1
    assert not list((tmp_path / "run/gradients").glob("*.tmp"))
    res = extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    assert res.resumed_shards == 1 and res.n_shards == clean.n_shards
    a, b = RunDir(tmp_path / "run").gradients.load_manifest(), RunDir(tmp_path / "clean").gradients.load_manifest()
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_extract_refuses_other_settings_naming_them(tmp_path, tiny_llama_loaded):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    cfg.model.layers = "last2"
    with pytest.raises(ConfigError, match=r"model\.layers: 'all' -> 'last2'.*--overwrite"):
        extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)


def test_extract_with_overwrite_recomputes_every_shard(tmp_path, tiny_llama_loaded):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    cfg.model.layers = "last2"
    assert extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, overwrite=True, show_progress=False).resumed_shards == 0


@pytest.mark.parametrize("store", ["dense", "projected"])
def test_other_stores_give_unit_self_similarity(tmp_path, tiny_llama_loaded, store):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl", store=store, proj_dim=8)
    extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    couple(cfg, tmp_path / "run", show_progress=False)
    _, cos = RunDir(tmp_path / "run").coupling.load_cosine()
    assert (cos.diagonal() - 1).abs().max() < UNIT_DIAGONAL_ATOL


def test_shards_are_written_on_a_background_thread_while_the_next_is_computed(tmp_path, tiny_llama_loaded, monkeypatch):
    import threading
    import time

    import gradcouple.stages.extract as extract_mod

    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = _cfg(tmp_path / "p.jsonl")
    extract(cfg, tmp_path / "clean", loaded=tiny_llama_loaded, show_progress=False)
    events, real_write, real_shard = [], ShardWriter.write, extract_mod.extract_shard

    def slow_write(self, path, taken):
        events.append(("write", path.name, threading.current_thread().name))
        time.sleep(0.2)
        out = real_write(self, path, taken)
        events.append(("written", path.name, threading.current_thread().name))
        return out

    def shard(*args, **kwargs):
        events.append(("compute", None, threading.current_thread().name))
        return real_shard(*args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write", slow_write)
    monkeypatch.setattr(extract_mod, "extract_shard", shard)
    res = extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    writes = [e for e in events if e[0] == "write"]
    assert len(writes) == res.n_shards >= 3 and all(t.startswith("gradcouple-shards") for _, _, t in writes)
    kinds = [e[0] for e in events]
    assert ["write", "compute", "written"] == kinds[kinds.index("write"):kinds.index("write") + 3]  # overlap
    a, b = RunDir(tmp_path / "run").gradients.load_manifest(), RunDir(tmp_path / "clean").gradients.load_manifest()
    assert a.fingerprint() == b.fingerprint()
