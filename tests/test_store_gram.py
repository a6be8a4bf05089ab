"""fp16 shards round-trip, and the blocked Gram/cosine code against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

from gradcouple.gradients import batch_factors
from gradcouple.gram import cosine_from_gram, gram_matrix, plan_layers, topk_cosine
from gradcouple.layers import select_targets
from gradcouple.scoring import collate
from gradcouple.store import GradientStore

from conftest import random_pieces, tiny_gpt2, tiny_llama
from oracle import cosine_from_gram as ref_cosine, oracle_gram
from storeutil import write_store


@pytest.fixture(params=["gpt2", "llama"])
def setup(request):
    model = tiny_gpt2() if request.param == "gpt2" else tiny_llama()
    targets = select_targets(model, "all")
    pieces = random_pieces(10, seed=11)
    factors = batch_factors(model, targets, collate(pieces))
    ref, _ = oracle_gram(model, targets, pieces)
    return model, targets, pieces, factors, ref


@pytest.mark.parametrize("method", ["factored", "dense"])
def test_cosine_from_fp16_factor_shards(tmp_path, setup, method):
    _, targets, _, factors, ref = setup
    write_store(tmp_path, targets, factors, order=[3, 1, 4, 0, 5, 9, 2, 6, 8, 7])
    G = gram_matrix(GradientStore(tmp_path), block_size=4, method=method)
    err = (cosine_from_gram(G) - ref_cosine(ref)).abs().max().item()
    assert err < 1e-3
    assert torch.allclose(G, ref, rtol=3e-3, atol=3e-3 * ref.abs().max().item())


def test_dense_store_roundtrip(tmp_path, setup):
    _, targets, _, factors, ref = setup
    write_store(tmp_path, targets, factors, store="dense")
    G = gram_matrix(GradientStore(tmp_path), block_size=3)
    assert (cosine_from_gram(G) - ref_cosine(ref)).abs().max().item() < 1e-3


def test_tiny_gradients_do_not_underflow(tmp_path, setup):
    """Gradients of magnitude ~1e-9 (far below fp16's normal range) keep their cosines."""
    _, targets, _, factors, ref = setup
    for f in factors:
        for n in f.d:
            f.d[n] = f.d[n] * 1e-9
    assert max(f.d[n].abs().max().item() for f in factors for n in f.d) < 1e-6
    write_store(tmp_path, targets, factors)
    store = GradientStore(tmp_path)
    shard = store.shard(0)
    assert all((v["d"] != 0).any() for v in shard["layers"].values())
    cos = cosine_from_gram(gram_matrix(store, block_size=5))
    assert (cos - ref_cosine(ref)).abs().max().item() < 1e-3


def test_topk_matches_full_matrix(tmp_path, setup):
    _, targets, _, factors, _ = setup
    write_store(tmp_path, targets, factors, order=list(range(9, -1, -1)))
    store = GradientStore(tmp_path)
    cos = cosine_from_gram(gram_matrix(store, block_size=4))
    idx, vals = topk_cosine(store, k=3, block_size=4)
    cos.fill_diagonal_(-2)
    ref_vals, ref_idx = cos.topk(3, dim=1)
    assert torch.allclose(vals.double(), ref_vals, atol=1e-5)
    assert torch.equal(idx, ref_idx)


def test_shard_checksum_is_verified(tmp_path, setup):
    _, targets, _, factors, _ = setup
    write_store(tmp_path, targets, factors)
    with open(tmp_path / "shard-00001.pt", "ab") as fh:
        fh.write(b"x")
    from gradcouple.errors import ArtifactError

    with pytest.raises(ArtifactError, match="shard-00001.pt"):
        GradientStore(tmp_path)


def test_cost_model_picks_cheaper_method(tmp_path, setup):
    _, targets, _, factors, _ = setup
    write_store(tmp_path, targets, factors)
    for p in plan_layers(GradientStore(tmp_path)):
        assert p.method == ("factored" if p.factored_cost <= p.dense_cost else "dense")


def test_memory_bound_lowers_block_size_and_keeps_results(tmp_path, setup):
    from gradcouple.gram import block_bytes, fit_block_size, store_plans

    _, targets, _, factors, ref = setup
    write_store(tmp_path, targets, factors)
    store = GradientStore(tmp_path)
    plans = store_plans(store)
    loaded, scratch = block_bytes(store, plans, 8)
    budget = 2 * (2 * loaded + scratch)
    assert fit_block_size(store, plans, 8, budget) == 8
    assert fit_block_size(store, plans, 8, budget / 8) < 8
    G = gram_matrix(store, block_size=8, max_memory=budget / 8)
    assert (cosine_from_gram(G) - ref_cosine(ref)).abs().max().item() < 1e-3


def test_kronecker_sketch_from_factors_equals_from_matrix(setup):
    from gradcouple.store import KroneckerProjection

    _, targets, _, factors, _ = setup
    t = targets[0]
    kp = KroneckerProjection(t.name, t.d_in_aug, t.d_out, k=3, blocks=5, seed=7)
    f = factors[0]
    a = kp.from_factors(f.x[t.name], f.d[t.name])
    b = kp.from_matrix(f.dense(t.name))
    assert a.shape == (5, 3, 3) and torch.allclose(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())


def test_block_sketches_unbiased_and_tighter(setup):
    """Mean over seeds within 3 standard errors of the exact inner product; many small blocks
    have a smaller spread than one block of the same size."""
    from gradcouple.store import KroneckerProjection

    _, targets, _, factors, ref = setup
    t = targets[-1]
    fi, fj = factors[0], factors[1]
    exact = float((fi.dense(t.name).double() * fj.dense(t.name).double()).sum())
    spread = {}
    for k, m in [(8, 1), (2, 16)]:
        est = []
        for seed in range(200):
            kp = KroneckerProjection(t.name, t.d_in_aug, t.d_out, k, m, seed)
            est.append(float((kp.from_factors(fi.x[t.name], fi.d[t.name]).double()
                              * kp.from_factors(fj.x[t.name], fj.d[t.name]).double()).sum()))
        est = torch.tensor(est, dtype=torch.float64)
        se = est.std() / len(est) ** 0.5
        assert abs(est.mean() - exact) < 3 * se
        spread[(k, m)] = float(est.std())
    assert spread[(2, 16)] < spread[(8, 1)]


def test_topk_pairs_keep_pairs_found_from_either_side(tmp_path):
    from gradcouple.couple import _topk_stats

    metas = [{"id": f"p{i}", "question_id": f"q{i}", "prompt": "x", "answer": f"a{i}"} for i in range(3)]
    idx = torch.tensor([[1], [0], [0]])
    vals = torch.tensor([[0.9], [0.9], [0.8]])
    _topk_stats(idx, vals, metas, [{"q0"}, {"q1"}, {"q2"}], tmp_path / "pairs.csv", 10)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "pairs.csv", encoding="utf-8")))
    assert [(r["id_a"], r["id_b"]) for r in rows] == [("p0", "p1"), ("p0", "p2")]


def test_block_memory_is_sized_by_the_longest_block(tmp_path, setup):
    from gradcouple.gram import max_block_tokens

    _, targets, _, factors, _ = setup
    write_store(tmp_path, targets, factors)
    store = GradientStore(tmp_path)
    lens = [m["n_inputs"] for m in store.manifest["pieces"]]
    assert max_block_tokens(store, 1) == max(lens)
    assert max_block_tokens(store, 10) == sum(lens)
    assert max_block_tokens(store, 4) >= 4 * sum(lens) / len(lens) * 0.5
