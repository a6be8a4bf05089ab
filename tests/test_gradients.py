"""Factored per-example gradients against plain autograd, one piece per backward."""

from __future__ import annotations

import torch

from gradcouple.gradients import batch_factors
from gradcouple.layers import select_targets
from gradcouple.scoring import answer_logprob, collate, full_logits_logprob

from conftest import random_pieces
from oracle import oracle_gradients, oracle_gram


def _factored_gram(pf, targets):
    n = len(pf)
    G = torch.zeros(n, n, dtype=torch.float64)
    for t in targets:
        for i in range(n):
            for j in range(n):
                xi, xj = pf[i].x[t.name].double(), pf[j].x[t.name].double()
                di, dj = pf[i].d[t.name].double(), pf[j].d[t.name].double()
                G[i, j] += ((xi @ xj.t()) * (di @ dj.t())).sum()
    return G


def test_factored_inner_products_match_autograd(tiny_model):
    targets = select_targets(tiny_model, "all")
    pieces = random_pieces(7, seed=3)
    batch = collate(pieces, pad_id=5)
    pf = batch_factors(tiny_model, targets, batch)
    ref, ref_lp = oracle_gram(tiny_model, targets, pieces)
    G = _factored_gram(pf, targets)
    assert torch.allclose(G, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    norms = torch.tensor([sum(p.sq_norm.values()) for p in pf], dtype=torch.float64)
    assert torch.allclose(norms, ref.diagonal(), rtol=1e-5)
    assert torch.allclose(torch.tensor([p.logprob for p in pf], dtype=torch.float64), torch.tensor(ref_lp, dtype=torch.float64), atol=1e-4)


def test_dense_from_factors_equals_weight_grad(tiny_model):
    targets = select_targets(tiny_model, "last2")
    pieces = random_pieces(4, seed=4)
    pf = batch_factors(tiny_model, targets, collate(pieces))
    for p, f in zip(pieces, pf):
        ref, _ = oracle_gradients(tiny_model, targets, p)
        for t in targets:
            g = f.dense(t.name).double()
            assert g.shape == (t.d_out, t.d_in_aug)
            assert torch.allclose(g, ref[t.name], rtol=1e-4, atol=1e-6 * ref[t.name].abs().max().item())


def test_batch_padding_does_not_change_results(tiny_model):
    targets = select_targets(tiny_model, "all")
    pieces = random_pieces(6, seed=5)
    batched = batch_factors(tiny_model, targets, collate(pieces))
    single = [batch_factors(tiny_model, targets, collate([p]))[0] for p in pieces]
    for a, b in zip(batched, single):
        assert abs(a.logprob - b.logprob) < 1e-4
        for t in targets:
            assert torch.allclose(a.d[t.name], b.d[t.name], atol=1e-6)


def test_logits_only_at_answer_positions_equal_full_forward(tiny_model):
    batch = collate(random_pieces(5, seed=6))
    with torch.no_grad():
        assert torch.allclose(answer_logprob(tiny_model, batch), full_logits_logprob(tiny_model, batch), atol=1e-5)


def test_gpt2_conv1d_targets_are_transposed():
    from conftest import tiny_gpt2

    t = select_targets(tiny_gpt2(), "0")[0]
    assert t.transposed and t.has_bias and (t.d_in, t.d_out) == (128, 32)
    assert t.weight_matrix().shape == (32, 129)


def test_no_weight_gradient_and_no_graph_below_the_lowest_target(tiny_model):
    from gradcouple.capture import FactorCapture
    from gradcouple.scoring import answer_logprob

    targets = select_targets(tiny_model, "last2")
    batch = collate(random_pieces(3, seed=8))
    with FactorCapture(targets) as cap:
        with torch.enable_grad():
            lp = answer_logprob(tiny_model, batch)
            lp.sum().backward()
        lowest = targets[0].name
        assert not cap.inputs[lowest].requires_grad  # nothing below the lowest target was recorded
        assert set(cap.grads) == {t.name for t in targets}
    assert all(p.grad is None and not p.requires_grad for p in tiny_model.parameters())


def test_falcon_inplace_add_into_mlp_output():
    """Falcon adds attention into the MLP output in place; the capture must not hand it a leaf."""
    from transformers import FalconConfig, FalconForCausalLM

    from oracle import oracle_gram

    torch.manual_seed(3)
    m = FalconForCausalLM(FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                       parallel_attn=True, new_decoder_architecture=False)).eval().requires_grad_(False)
    targets = select_targets(m, "last2")
    pieces = random_pieces(3, seed=12)
    pf = batch_factors(m, targets, collate(pieces))
    ref, _ = oracle_gram(m, targets, pieces)
    norms = torch.tensor([sum(p.sq_norm.values()) for p in pf], dtype=torch.float64)
    assert torch.allclose(norms, ref.diagonal(), rtol=1e-5)
