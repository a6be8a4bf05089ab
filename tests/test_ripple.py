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
from gradcouple.scoring import collate
from gradcouple.edits import finetune_edit, restore, snapshot
from gradcouple.ripple import choose_edits, first_order, ripple
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


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rome_edit_is_rank_one_and_moves_the_key_by_delta(arch):
    from conftest import random_pieces, tiny_gpt2, tiny_llama
    from gradcouple.edits import rome_edit
    from gradcouple.scoring import answer_logprob

    model = tiny_gpt2() if arch == "gpt2" else tiny_llama()
    targets = select_targets(model, "all")
    t = targets[1]
    piece = random_pieces(1, seed=9, min_len=8)[0]
    batch = collate([piece])
    with torch.no_grad():
        before_lp = float(answer_logprob(model, batch))
    keys = []
    h = t.module.register_forward_hook(lambda m, a, o: keys.append(a[0][0, piece.answer_start - 1].double()))
    with torch.no_grad():
        answer_logprob(model, batch)
    h.remove()
    k = torch.cat([keys[0], torch.ones(1, dtype=torch.float64)]) if t.has_bias else keys[0]
    saved = snapshot(targets)
    w0 = t.weight_matrix().double()
    cov = torch.eye(t.d_in_aug, dtype=torch.float64) * 2.0
    deltas = rome_edit(model, targets, t, piece, cov, steps=10, lr=0.5)
    dw = deltas[t.name].double()
    assert torch.allclose(t.weight_matrix().double() - w0, dw, atol=1e-5)
    s = torch.linalg.svdvals(dw)
    assert s[1] < 1e-5 * s[0]
    # with C = 2 I: dW = delta k^T / (k^T k), so dW k = delta and dW = (dW k) k^T / (k^T k)
    assert torch.allclose(dw, torch.outer(dw @ k, k) / (k @ k), atol=1e-6 * float(dw.abs().max()))
    assert all(float(deltas[o.name].abs().max()) == 0 for o in targets if o.name != t.name)
    with torch.no_grad():
        assert float(answer_logprob(model, batch)) > before_lp
    assert restore(targets, saved)
    assert torch.equal(t.weight_matrix(), w0.float())


def test_ripple_stage_with_rome(tmp_path, tiny_llama_loaded):
    cfg = _run(tmp_path, tiny_llama_loaded)
    cfg.ripple.n_edits = 2
    cfg.ripple.method = "rome"
    res = ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    s = res.summary
    assert s["method"] == "rome" and all(e["restored"] for e in s["edits"])
    assert all(e["logprob_new_after"] > e["logprob_new_before"] for e in s["edits"])


def test_rome_needs_factors_store(tmp_path, tiny_llama_loaded):
    from gradcouple.errors import ArtifactError

    cfg = _run(tmp_path, tiny_llama_loaded, store="dense")
    cfg.ripple.method = "rome"
    with pytest.raises(ArtifactError, match="--store factors"):
        ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)


def test_finetune_edit_moves_bfloat16_weights():
    from conftest import random_pieces, tiny_llama

    model = tiny_llama().to(torch.bfloat16)
    targets = select_targets(model, "all")
    saved = snapshot(targets)
    deltas = finetune_edit(model, targets, random_pieces(1, seed=2)[0], steps=3, lr=1e-4)
    for d in deltas.values():
        assert torch.isfinite(d).all() and d.device.type == "cpu"
        assert (d != 0).float().mean() > 0.5  # fp32 master weights: small steps are not rounded away
    assert restore(targets, saved)


def test_ripple_refuses_coupling_from_another_extraction(tmp_path, tiny_llama_loaded):
    from gradcouple.errors import ArtifactError

    cfg = _run(tmp_path, tiny_llama_loaded)
    cfg.model.layers = "last2"
    extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, overwrite=True, show_progress=False)
    with pytest.raises(ArtifactError, match="rerun `gradcouple couple"):
        ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
