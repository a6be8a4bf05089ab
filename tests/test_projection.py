"""The `projected` store: Kronecker sketches whose inner products are unbiased over projection
seeds and exact in the limit of large k.

Tiny random GPT-2 and LLaMA models (no real model); exact values come from the autograd oracle.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import random_pieces, tiny_gpt2, tiny_llama
from oracle import cosine_from_gram as oracle_cosine
from oracle import flatten, oracle_piece_gradients
from storeutil import write_store

from gradcouple.gradients import batch_factors
from gradcouple.gram import cosine_from_gram, gram_matrix, plan_methods
from gradcouple.layers import select_targets
from gradcouple.scoring import collate
from gradcouple.stores.projected import KroneckerProjection, projection_matrices

N_PIECES = 8
SEEDS = 20               # projection seeds per unbiasedness test
SMALL_K = 8              # deliberately small k: large variance, so a mis-scaled P (variance 1, not 1/k) is off by k^2
Z_LIMIT = 3              # standard errors
Z_MAX = 5                # standard errors
MAX_OUTLIERS = 2         # of the 36 distinct Gram entries, ~0.25 are expected beyond Z_LIMIT (t, 19 d.o.f.) by chance
SPREAD_MAX = 5           # std of one projected inner product in units of |g_i| |g_j|
VARIANCE_RTOL = 0.05     # sample variance of 64k projection entries vs 1/k
SKETCH_RTOL = 1e-4       # float32 sketch from factors vs from the dense matrix
SKETCH_ATOL = 1e-6       # in units of max |sketch|
SKETCH_SEEDS = 200       # seeds of the block-layout comparison
LARGE_K, SMALL_K_GRAM = 1024, 16
COS_ATOL_LARGE_K = 0.1   # max |GradSim - oracle| with one 1024 x 1024 sketch per target
NORM_RTOL_LARGE_K = 0.25
ERROR_SHRINK = 2         # mean cosine error at k = 1024 is at least this many times smaller than at k = 16


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def case(request):
    model = tiny_gpt2() if request.param == "gpt2" else tiny_llama()
    targets = select_targets(model, "all")
    pieces = random_pieces(N_PIECES, seed=5)
    factors = batch_factors(model, targets, collate(pieces))
    grads, _ = oracle_piece_gradients(model, targets, pieces)
    flat = flatten(grads, [t.name for t in targets])
    return SimpleNamespace(targets=targets, factors=factors, grads=grads, gram=flat @ flat.t())


# ---------------------------------------------------------------- projection matrices


def test_projection_matrices_have_the_requested_shapes():
    p_in, p_out = projection_matrices("a", 48, 32, 8, seed=3, blocks=5)
    assert (p_in.shape, p_out.shape) == ((40, 48), (40, 32))


def test_projection_matrices_are_deterministic_per_seed():
    assert torch.equal(projection_matrices("a", 48, 32, 8, seed=3)[0], projection_matrices("a", 48, 32, 8, seed=3)[0])


def test_projection_seed_changes_the_matrices():
    assert not torch.equal(projection_matrices("a", 48, 32, 8, seed=3)[0], projection_matrices("a", 48, 32, 8, seed=4)[0])


def test_each_target_gets_its_own_projection():
    assert not torch.equal(projection_matrices("a", 48, 32, 8, seed=3)[0], projection_matrices("b", 48, 32, 8, seed=3)[0])


def test_projection_entries_have_variance_one_over_k():
    k = 16
    p_in, p_out = projection_matrices("a", 4096, 4096, k, seed=0)
    for p in (p_in, p_out):
        assert float(p.double().var()) == pytest.approx(1 / k, rel=VARIANCE_RTOL)


# ---------------------------------------------------------------- one k x k sketch per target


def projected_ip(case, i: int, j: int, k: int, seed: int) -> float:
    """<P_out G_i P_in^T, P_out G_j P_in^T> over all targets in float64, from the oracle's G and the store's P."""
    total = 0.0
    for t in case.targets:
        p_in, p_out = (p.double() for p in projection_matrices(t.name, t.d_in_aug, t.d_out, k, seed))
        gi, gj = (p_out @ case.grads[r][t.name] @ p_in.t() for r in (i, j))
        total += float((gi * gj).sum())
    return total


PAIRS = [(0, 1), (2, 5), (3, 7), (4, 4)]


@pytest.fixture(scope="module")
def pair_estimates(case):
    """{(i, j): (SEEDS,) projected inner products with k = SMALL_K}."""
    return {(i, j): torch.tensor([projected_ip(case, i, j, SMALL_K, s) for s in range(SEEDS)], dtype=torch.float64)
            for i, j in PAIRS}


@pytest.mark.parametrize("pair", PAIRS)
def test_projected_inner_products_are_unbiased(case, pair_estimates, pair):
    """The mean over seeds lies within Z_LIMIT standard errors of the exact inner product."""
    est = pair_estimates[pair]
    se = float(est.std()) / math.sqrt(SEEDS)
    assert se > 0
    assert abs(float(est.mean()) - float(case.gram[pair])) <= Z_LIMIT * se, (float(est.mean()), float(case.gram[pair]), se)


@pytest.mark.parametrize("pair", PAIRS)
def test_projected_inner_product_spread_is_on_the_scale_of_the_norms(case, pair_estimates, pair):
    """The spread is comparable to |g_i| |g_j|, not orders of magnitude off (a mis-scaled P would be)."""
    i, j = pair
    assert float(pair_estimates[pair].std()) < SPREAD_MAX * math.sqrt(float(case.gram[i, i]) * float(case.gram[j, j]))


# ---------------------------------------------------------------- through the store


@pytest.mark.parametrize("k,blocks", [(SMALL_K, 1), (2, 16)])
def test_projected_store_gram_is_unbiased_over_seeds(tmp_path, case, k, blocks):
    """Feature map, fp16 shards and Gram together: the mean over seeds of each projected inner
    product lies within Z_LIMIT standard errors of the exact one, for one k x k sketch and for
    several small ones (the default layout)."""
    grams = []
    for s in range(SEEDS):
        reader = write_store(tmp_path / f"s{s}", case.targets, case.factors, store="projected", proj_dim=k,
                             proj_blocks=blocks, seed=s, shard_size=N_PIECES)
        grams.append(gram_matrix(reader, N_PIECES, plan_methods(reader)))
    est = torch.stack(grams)  # (seeds, N, N)
    se = est.std(0) / math.sqrt(SEEDS)
    assert (se > 0).all()
    iu = torch.triu_indices(N_PIECES, N_PIECES)
    z = ((est.mean(0) - case.gram) / se).abs()[iu[0], iu[1]]
    assert int((z > Z_LIMIT).sum()) <= MAX_OUTLIERS, z
    assert float(z.max()) < Z_MAX, z


@pytest.fixture(scope="module")
def grams_by_k(tmp_path_factory, case):
    """{k: Gram matrix of the projected store with one k x k sketch per target}."""
    out = {}
    for k in (SMALL_K_GRAM, LARGE_K):
        reader = write_store(tmp_path_factory.mktemp(f"k{k}"), case.targets, case.factors, store="projected",
                             proj_dim=k, shard_size=3)
        out[k] = gram_matrix(reader, 3, plan_methods(reader))
    return out


def test_projected_cosines_are_close_to_exact_at_large_k(case, grams_by_k):
    assert float((cosine_from_gram(grams_by_k[LARGE_K]) - oracle_cosine(case.gram)).abs().max()) < COS_ATOL_LARGE_K


def test_projected_cosine_error_shrinks_as_k_grows(case, grams_by_k):
    err = {k: float((cosine_from_gram(G) - oracle_cosine(case.gram)).abs().mean()) for k, G in grams_by_k.items()}
    assert err[LARGE_K] < err[SMALL_K_GRAM] / ERROR_SHRINK, err


def test_projected_sq_norms_are_close_to_exact_at_large_k(case, grams_by_k):
    assert torch.allclose(grams_by_k[LARGE_K].diagonal(), case.gram.diagonal(), rtol=NORM_RTOL_LARGE_K)


# ---------------------------------------------------------------- Kronecker sketch layouts


def test_kronecker_sketch_from_factors_equals_sketch_from_matrix(case):
    t, f = case.targets[0], case.factors[0]
    kp = KroneckerProjection(t.name, t.d_in_aug, t.d_out, k=3, blocks=5, seed=7)
    a = kp.from_factors(f.x[t.name], f.d[t.name])
    b = kp.from_matrix(case.grads[0][t.name].float())
    assert a.shape == (5, 3, 3)
    assert torch.allclose(a, b, rtol=SKETCH_RTOL, atol=SKETCH_ATOL * b.abs().max().item())


LAYOUTS = [(8, 1), (2, 16)]  # (k, blocks): the same 64 numbers per target, as one sketch or as 16 small ones


@pytest.fixture(scope="module")
def layout_estimates(case):
    """(exact <G_0, G_1> of the last target, {(k, blocks): (SKETCH_SEEDS,) sketch inner products})."""
    t = case.targets[-1]
    fi, fj = case.factors[0], case.factors[1]
    est = {}
    for k, m in LAYOUTS:
        vals = []
        for seed in range(SKETCH_SEEDS):
            kp = KroneckerProjection(t.name, t.d_in_aug, t.d_out, k, m, seed)
            vals.append(float((kp.from_factors(fi.x[t.name], fi.d[t.name]).double()
                               * kp.from_factors(fj.x[t.name], fj.d[t.name]).double()).sum()))
        est[(k, m)] = torch.tensor(vals, dtype=torch.float64)
    return float((case.grads[0][t.name] * case.grads[1][t.name]).sum()), est


@pytest.mark.parametrize("layout", LAYOUTS)
def test_block_sketches_are_unbiased(layout_estimates, layout):
    exact, est = layout_estimates
    se = float(est[layout].std()) / math.sqrt(SKETCH_SEEDS)
    assert abs(float(est[layout].mean()) - exact) < Z_LIMIT * se


def test_many_small_blocks_spread_less_than_one_block_of_equal_size(layout_estimates):
    _, est = layout_estimates
    assert float(est[(2, 16)].std()) < float(est[(8, 1)].std())
