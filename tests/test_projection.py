"""The `projected` store: unbiased inner products over projection seeds, exact in the limit of large k.

Tiny random GPT-2 and LLaMA models (no real model); runs in a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from gradcouple.gradients import batch_factors
from gradcouple.gram import cosine_from_gram, gram_matrix
from gradcouple.layers import select_targets
from gradcouple.scoring import collate
from gradcouple.store import GradientStore, projection_matrices

from conftest import random_pieces, tiny_gpt2, tiny_llama
from oracle import cosine_from_gram as ref_cosine, oracle_gram
from storeutil import write_store

SEEDS = 20


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    model = tiny_gpt2() if request.param == "gpt2" else tiny_llama()
    targets = select_targets(model, "all")
    pieces = random_pieces(8, seed=5)
    factors = batch_factors(model, targets, collate(pieces))
    ref, _ = oracle_gram(model, targets, pieces)
    return model, targets, pieces, factors, ref


def _projected_ip(targets, fi, fj, k: int, seed: int) -> float:
    """<P_out G_i P_in^T, P_out G_j P_in^T> summed over targets, in float64, projecting the
    factors first as the store does: (Delta P_out^T)^T (X P_in^T)."""
    total = 0.0
    for t in targets:
        p_in, p_out = (p.double() for p in projection_matrices(t.name, t.d_in_aug, t.d_out, k, seed))
        gi = (fi.d[t.name].double() @ p_out.t()).t() @ (fi.x[t.name].double() @ p_in.t())
        gj = (fj.d[t.name].double() @ p_out.t()).t() @ (fj.x[t.name].double() @ p_in.t())
        total += float((gi * gj).sum())
    return total


def test_projection_matrices_shapes_and_determinism():
    p_in, p_out = projection_matrices("a", 48, 32, 8, seed=3)
    assert p_in.shape == (8, 48) and p_out.shape == (8, 32)
    assert torch.equal(p_in, projection_matrices("a", 48, 32, 8, seed=3)[0])
    assert not torch.equal(p_in, projection_matrices("a", 48, 32, 8, seed=4)[0])  # the seed matters
    assert not torch.equal(p_in, projection_matrices("b", 48, 32, 8, seed=3)[0])  # each target has its own P


@pytest.mark.parametrize("pair", [(0, 1), (2, 5), (3, 7), (4, 4)])
def test_projected_inner_products_are_unbiased(setup, pair):
    """Mean over 20 projection seeds lies within 3 standard errors of the exact inner product.

    k = 8 is deliberately small (large variance): a mis-scaled projection (e.g. entries of
    variance 1 instead of 1/k) would be off by a factor k^2 = 64, far outside 3 s.e.
    """
    _, targets, _, factors, ref = setup
    i, j = pair
    exact = float(ref[i, j])
    est = torch.tensor([_projected_ip(targets, factors[i], factors[j], 8, s) for s in range(SEEDS)], dtype=torch.float64)
    se = float(est.std()) / math.sqrt(SEEDS)
    assert se > 0
    assert abs(float(est.mean()) - exact) <= 3 * se, (float(est.mean()), exact, se)
    # and the scale is right: the spread is comparable to |g_i||g_j|, not orders of magnitude off
    assert float(est.std()) < 5 * math.sqrt(float(ref[i, i]) * float(ref[j, j]))


@pytest.mark.parametrize("k,blocks", [(8, 1), (2, 16)])
def test_projected_store_is_unbiased_over_seeds(tmp_path, setup, k, blocks):
    """Through the store itself (feature map, fp16 shards, Gram): the mean over 20 seeds of each
    projected inner product lies within 3 standard errors of the exact one, for one k x k sketch
    and for several small ones (the default layout)."""
    _, targets, _, factors, ref = setup
    grams = []
    for s in range(SEEDS):
        d = tmp_path / f"s{s}"
        write_store(d, targets, factors, store="projected", proj_dim=k, proj_blocks=blocks, seed=s, shard_size=8)
        grams.append(gram_matrix(GradientStore(d), block_size=8))
    est = torch.stack(grams)  # (seeds, N, N)
    mean, se = est.mean(0), est.std(0) / math.sqrt(SEEDS)
    assert (se > 0).all()
    z = (mean - ref) / se
    # 36 distinct entries, t with 19 d.o.f.: ~0.25 of them are expected beyond 3 s.e. by chance
    iu = torch.triu_indices(8, 8)
    distinct = z.abs()[iu[0], iu[1]]
    assert int((distinct > 3).sum()) <= 2, z
    assert float(distinct.max()) < 5, z


def test_projected_store_gram_approaches_exact(tmp_path, setup):
    """The `projected` store's Gram converges to the exact one as k grows (error ~ 1/sqrt(k))."""
    _, targets, _, factors, ref = setup
    errs = {}
    for k in (16, 1024):
        d = tmp_path / f"k{k}"
        write_store(d, targets, factors, store="projected", proj_dim=k, shard_size=3)
        G = gram_matrix(GradientStore(d), block_size=3)
        errs[k] = (cosine_from_gram(G) - ref_cosine(ref)).abs()
    assert float(errs[1024].max()) < 0.1
    assert float(errs[1024].mean()) < float(errs[16].mean()) / 2
    assert torch.allclose(G.diagonal(), ref.diagonal(), rtol=0.25)
