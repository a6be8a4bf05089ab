"""Per-example gradients as exact factors, against plain autograd one piece per backward.

Tiny random GPT-2 (Conv1D with bias) and LLaMA models, run as one padded batch; the oracle
runs each piece alone with the model's full logits, in float64.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, random_pieces, tiny_gpt2, tiny_llama
from oracle import flatten, oracle_gradients, oracle_piece_gradients
from transformers import FalconConfig, FalconForCausalLM

from gradcouple.capture import FactorCapture
from gradcouple.gradients import batch_factors
from gradcouple.layers import select_targets
from gradcouple.scoring import answer_logprob, collate, full_logits_logprob
from gradcouple.stores import FactoredBlock

GRAD_RTOL = 1e-4        # float32 factors vs float64 autograd, per entry
GRAD_ATOL = 1e-6        # in units of max |oracle gradient|
SQ_NORM_RTOL = 1e-5     # squared norms accumulated in float64 from float32 factors
GRAM_RTOL = 1e-5        # ghost inner products of float32 factors vs the oracle Gram
GRAM_ATOL = 1e-5        # in units of max |oracle Gram|
LOGPROB_ATOL = 1e-4     # nats
PADDING_ATOL = 1e-6     # factors of a piece batched with others vs alone
SCORED_ATOL = 1e-5      # nats: log-probs from the answer positions only vs the full forward
PAD_ID = 5


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return tiny_gpt2() if request.param == "gpt2" else tiny_llama()


@pytest.fixture(scope="module")
def batched(model):
    """(targets, pieces, factors from one padded batch, oracle gradients, oracle log-probs), all targets."""
    targets = select_targets(model, "all")
    pieces = random_pieces(7, seed=3)
    factors = batch_factors(model, targets, collate(pieces, pad_id=PAD_ID))
    grads, lps = oracle_piece_gradients(model, targets, pieces)
    return targets, pieces, factors, grads, lps


def test_gradients_from_factors_equal_autograd(batched):
    targets, _, factors, grads, _ = batched
    for f, g in zip(factors, grads):
        for t in targets:
            ref = g[t.name]
            assert torch.allclose(f.dense(t.name).double(), ref, rtol=GRAD_RTOL, atol=GRAD_ATOL * ref.abs().max().item())


def test_gradients_from_factors_have_the_weight_layout(batched):
    """(d_out, d_in + bias): the bias gradient is the last column."""
    targets, _, factors, _, _ = batched
    assert all(f.dense(t.name).shape == (t.d_out, t.d_in_aug) for f in factors for t in targets)


def test_squared_norms_equal_autograd(batched):
    targets, _, factors, grads, _ = batched
    for f, g in zip(factors, grads):
        for t in targets:
            assert f.sq_norm[t.name] == pytest.approx(float((g[t.name] ** 2).sum()), rel=SQ_NORM_RTOL)


def test_logprobs_equal_autograd_forward(batched):
    _, _, factors, _, lps = batched
    assert [f.logprob for f in factors] == pytest.approx(lps, abs=LOGPROB_ATOL)


def test_ghost_inner_products_of_factors_equal_the_oracle_gram(batched):
    """A FactoredBlock of all pieces (one-hot segment rows, unit scales) gives every <G_i, G_j>."""
    targets, _, factors, grads, _ = batched
    flat = flatten(grads, [t.name for t in targets])
    ref = flat @ flat.t()
    lengths = torch.tensor([f.x[targets[0].name].shape[0] for f in factors])
    seg = torch.repeat_interleave(torch.arange(len(factors)), lengths)
    s = torch.zeros(len(factors), int(lengths.sum()))
    s[seg, torch.arange(seg.numel())] = 1.0
    G = torch.zeros_like(ref)
    for t in targets:
        blk = FactoredBlock(torch.cat([f.x[t.name] for f in factors]), torch.cat([f.d[t.name] for f in factors]), s)
        G += blk.inner(blk)
    assert torch.allclose(G, ref, rtol=GRAM_RTOL, atol=GRAM_ATOL * ref.abs().max().item())


def test_last2_targets_gradients_equal_autograd(model):
    """Only the top targets: the capture starts at the lowest of them."""
    targets = select_targets(model, "last2")
    pieces = random_pieces(4, seed=4)
    for p, f in zip(pieces, batch_factors(model, targets, collate(pieces))):
        ref, _ = oracle_gradients(model, targets, p)
        for t in targets:
            assert torch.allclose(f.dense(t.name).double(), ref[t.name], rtol=GRAD_RTOL,
                                  atol=GRAD_ATOL * ref[t.name].abs().max().item())


@pytest.fixture(scope="module")
def alone_and_batched(model):
    targets = select_targets(model, "all")
    pieces = random_pieces(6, seed=5)
    batched = batch_factors(model, targets, collate(pieces))
    alone = [batch_factors(model, targets, collate([p]))[0] for p in pieces]
    return targets, alone, batched


def test_batching_does_not_change_logprobs(alone_and_batched):
    _, alone, batched = alone_and_batched
    assert [b.logprob for b in batched] == pytest.approx([a.logprob for a in alone], abs=LOGPROB_ATOL)


def test_batching_does_not_change_output_gradients(alone_and_batched):
    targets, alone, batched = alone_and_batched
    assert all(torch.allclose(b.d[t.name], a.d[t.name], atol=PADDING_ATOL) for a, b in zip(alone, batched) for t in targets)


def test_batching_does_not_change_inputs(alone_and_batched):
    targets, alone, batched = alone_and_batched
    assert all(torch.allclose(b.x[t.name], a.x[t.name], atol=PADDING_ATOL) for a, b in zip(alone, batched) for t in targets)


def test_logits_only_at_answer_positions_equal_full_forward(model):
    batch = collate(random_pieces(5, seed=6))
    with torch.no_grad():
        assert torch.allclose(answer_logprob(model, batch), full_logits_logprob(model, batch), atol=SCORED_ATOL)


# ---------------------------------------------------------------- GPT-2 Conv1D orientation


def test_gpt2_conv1d_target_has_the_mathematical_shape():
    """Conv1D stores W as (d_in, d_out); the target reports y = W x + b with W (d_out, d_in)."""
    t = select_targets(tiny_gpt2(), "0")[0]
    assert (t.transposed, t.has_bias, t.d_in, t.d_out) == (True, True, 128, 32)


def test_gpt2_conv1d_weight_matrix_is_w_transposed_with_the_bias_last():
    t = select_targets(tiny_gpt2(), "0")[0]
    expected = torch.cat([t.module.weight.t(), t.module.bias[:, None]], dim=1)
    assert torch.equal(t.weight_matrix(), expected)


# ---------------------------------------------------------------- what the capture records


@pytest.fixture
def captured(model):
    """(the last two targets, their capture after one backward of a batch)."""
    targets = select_targets(model, "last2")
    batch = collate(random_pieces(3, seed=8))
    with FactorCapture(targets) as cap:
        with torch.enable_grad():
            answer_logprob(model, batch).sum().backward()
    return targets, cap


def test_capture_records_no_graph_below_the_lowest_target(captured):
    targets, cap = captured
    assert not cap.inputs[targets[0].name].requires_grad


def test_capture_records_output_gradients_of_every_target(captured):
    targets, cap = captured
    assert set(cap.grads) == {t.name for t in targets}


def test_capture_computes_no_weight_gradient(model, captured):
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_falcon_inplace_add_into_mlp_output_keeps_gradients_exact():
    """Falcon adds attention into the MLP output in place; the capture must not hand it a leaf."""
    torch.manual_seed(3)
    m = FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                       parallel_attn=True, new_decoder_architecture=False)).eval().requires_grad_(False)
    targets = select_targets(m, "last2")
    pieces = random_pieces(3, seed=12)
    grads, _ = oracle_piece_gradients(m, targets, pieces)
    for f, g in zip(batch_factors(m, targets, collate(pieces)), grads):
        for t in targets:
            ref = g[t.name]
            assert torch.allclose(f.dense(t.name).double(), ref, rtol=GRAD_RTOL, atol=GRAD_ATOL * ref.abs().max().item())
