"""Ripple: edits restore the weights bit for bit, and predictions equal independent computations."""

from __future__ import annotations

import json

import pytest
import torch

from gradcouple.config import RunConfig
from gradcouple.couple import couple
from gradcouple.extract import encode_pieces, extract
from gradcouple.layers import select_targets
from gradcouple.pieces import read_pieces
from gradcouple.ripple import choose_edits, finetune_edit, first_order, restore, ripple, snapshot
from gradcouple.store import GradientStore

from conftest import write_fact_pieces
from oracle import oracle_gradients


def _run(tmp_path, loaded, store="factors"):
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = RunConfig()
    cfg.data.pieces = tmp_path / "p.jsonl"
    cfg.model.name = "llama-tiny-random"
    cfg.model.layers = "all"
    cfg.extract.store = store
    cfg.extract.shard_size = 4
    extract(cfg, tmp_path / "run", loaded=loaded, show_progress=False)
    couple(cfg, tmp_path / "run", show_progress=False)
    return cfg


def test_choose_edits_prefers_dataset_counterfactuals(tmp_path):
    pieces = write_fact_pieces(tmp_path / "p.jsonl")
    edits = choose_edits(pieces, 5, seed=0)
    assert [s for _, _, s in edits][:3] == ["dataset"] * 3
    assert {pieces[i].id for i, _, s in edits if s == "dataset"} == {"facts:q1:0", "facts:q2:0", "facts:q3:1"}
    for i, new, _ in edits:
        assert new.lower() != pieces[i].answer.lower() and pieces[i].kind.value != "multi_hop"
    assert edits == choose_edits(pieces, 5, seed=0)


@pytest.mark.parametrize("store", ["factors", "dense"])
def test_first_order_prediction_equals_autograd(tmp_path, tiny_llama_loaded, store):
    cfg = _run(tmp_path, tiny_llama_loaded, store)
    model, tok = tiny_llama_loaded.model, tiny_llama_loaded.tokenizer
    targets = select_targets(model, "all")
    pieces = read_pieces(tmp_path / "run/pieces.jsonl")
    enc = encode_pieces(tok, pieces, cfg)
    torch.manual_seed(0)
    deltas = {t.name: torch.randn(t.d_out, t.d_in_aug) * 1e-3 for t in targets}
    pred = first_order(GradientStore(tmp_path / "run/gradients"), deltas)
    ref = []
    for e in enc:
        g, _ = oracle_gradients(model, targets, e)
        ref.append(sum(float((g[t.name] * deltas[t.name].double()).sum()) for t in targets))
    ref = torch.tensor(ref, dtype=torch.float64)
    assert torch.allclose(pred, ref, rtol=3e-3, atol=3e-3 * ref.abs().max().item())


def test_edit_then_restore_is_bit_exact(tiny_llama_loaded, tmp_path):
    cfg = RunConfig()
    model, tok = tiny_llama_loaded.model, tiny_llama_loaded.tokenizer
    targets = select_targets(model, "all")
    pieces = write_fact_pieces(tmp_path / "p.jsonl")
    enc = encode_pieces(tok, pieces, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = snapshot(targets)
    deltas = finetune_edit(model, targets, enc[0], steps=3, lr=1e-2)
    assert all(d.abs().max() > 0 for d in deltas.values())
    assert restore(targets, saved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_ripple_stage(tmp_path, tiny_llama_loaded):
    cfg = _run(tmp_path, tiny_llama_loaded)
    cfg.ripple.n_edits = 3
    cfg.ripple.steps = 2
    res = ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    s = res.summary
    assert s["n_edits"] == 3 and all(e["restored"] for e in s["edits"])
    assert s["baseline_logprob_max_abs_diff_vs_manifest"] < 1e-4
    assert all(e["logprob_new_after"] > e["logprob_new_before"] for e in s["edits"])
    lines = [json.loads(x) for x in (tmp_path / "run/ripple/edits.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 9
    # the coupling prediction is <g_i, dtheta> * cos(i, j) * |g_j| / |g_i|, so its sign follows cos(i, j)
    for e in s["edits"]:
        rows = [x for x in lines if x["edited_id"] == e["piece_id"]]
        sign = 1 if e["first_order_self"] > 0 else -1
        assert all((x["predicted_coupling"] * sign >= 0) == (x["cosine"] >= 0) for x in rows if abs(x["cosine"]) > 1e-9)
