"""Gradient stores and the blocked Gram code, against the float64 autograd oracle.

Tiny random GPT-2 (Conv1D with bias) and LLaMA models, every MLP output projection a target.
Pieces are written in a shuffled store order, 3 per shard, and read in blocks of 4, so store
order, shard boundaries and block boundaries never coincide. Cost-model and memory tests use
synthetic factors of chosen widths and lengths (no model).
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import random_pieces, tiny_gpt2, tiny_llama
from oracle import cosine_from_gram as oracle_cosine
from oracle import flatten, oracle_first_order, oracle_piece_gradients
from storeutil import write_store

from gradcouple.artifacts import PieceRecord, TargetShape
from gradcouple.pairs import neighbour_pairs, topk_pairs
from gradcouple.errors import ArtifactError
from gradcouple.gradients import PieceFactors, batch_factors
from gradcouple.gram import cosine_from_gram, first_order, fit_block_size, gram_diagonal, gram_matrix, plan_methods, topk_cosine
from gradcouple.layers import select_targets
from gradcouple.rundir import RunDir
from gradcouple.scoring import collate
from gradcouple.stores import STORES, GradientReader

N_PIECES = 10
STORE_ORDER = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]  # store row -> piece index
SHARD_SIZE = 3
BLOCK = 4
TOP_K = 3

EXACT_KINDS = sorted(k for k, cls in STORES.items() if cls.exact)
APPROX_KINDS = sorted(k for k, cls in STORES.items() if not cls.exact)
# (store kind, requested Gram algorithm): every way an exact store can compute the Gram matrix
EXACT_GRAMS = [("factors", "factored"), ("factors", "dense"), ("dense", "auto")]

COS_ATOL_FP16 = 1e-3          # |GradSim - oracle GradSim| from fp16 exact stores
GRAM_RTOL_FP16 = 3e-3         # |G_ij - oracle| <= GRAM_RTOL_FP16 * (|oracle_ij| + max |oracle|)
SQ_NORM_RTOL_FP16 = 1e-3      # |g|^2 from fp16 exact stores, relative
FIRST_ORDER_ATOL_FP16 = 1e-4  # |<g_j, dW> - oracle| in units of |g_j| |dW| (its Cauchy-Schwarz bound)
TOPK_COS_ATOL = 1e-5          # top-k cosines are float32 copies of float64 ones
TINY_SCALE = 1e-9             # output gradients scaled far below fp16's smallest normal (6.1e-5)
APPROX_SEEDS = 20             # projection seeds of the approximate kinds' unbiasedness tests
Z_LIMIT = 3                   # standard errors: a mean further off counts as an outlier
Z_MAX = 5                     # standard errors: no mean may be further off
MAX_OUTLIERS = 2              # of N_PIECES t(19) statistics, ~0.07 are expected beyond Z_LIMIT by chance
AMPLE_MEMORY = 2.0**40        # bytes


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def case(request):
    """Model, targets, pieces, their exact factors, and the oracle's per-piece gradients and Gram."""
    model = tiny_gpt2() if request.param == "gpt2" else tiny_llama()
    targets = select_targets(model, "all")
    pieces = random_pieces(N_PIECES, seed=11)
    factors = batch_factors(model, targets, collate(pieces))
    grads, _ = oracle_piece_gradients(model, targets, pieces)
    names = [t.name for t in targets]
    flat = flatten(grads, names)
    return SimpleNamespace(targets=targets, names=names, factors=factors, grads=grads, flat=flat, gram=flat @ flat.t())


def store(root, case, kind="factors", factors=None, **kw) -> GradientReader:
    return write_store(root, case.targets, factors or case.factors, store=kind, order=STORE_ORDER,
                       shard_size=SHARD_SIZE, **kw)


def random_deltas(case, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(t.d_out, t.d_in_aug, generator=g) for t in case.targets}


def assert_unbiased(estimates: torch.Tensor, exact: torch.Tensor) -> None:
    """``estimates`` (seeds, N): the mean over seeds of each column is within a few standard errors of ``exact``."""
    se = estimates.std(0) / math.sqrt(estimates.shape[0])
    assert (se > 0).all()
    z = ((estimates.mean(0) - exact) / se).abs()
    assert int((z > Z_LIMIT).sum()) <= MAX_OUTLIERS, z
    assert float(z.max()) < Z_MAX, z


# ---------------------------------------------------------------- Gram matrix of exact stores


@pytest.mark.parametrize("kind,method", EXACT_GRAMS)
def test_gram_matrix_matches_oracle(tmp_path, case, kind, method):
    reader = store(tmp_path, case, kind)
    G = gram_matrix(reader, BLOCK, plan_methods(reader, method))
    assert torch.allclose(G, case.gram, rtol=GRAM_RTOL_FP16, atol=GRAM_RTOL_FP16 * case.gram.abs().max().item())


@pytest.mark.parametrize("kind,method", EXACT_GRAMS)
def test_cosines_match_oracle(tmp_path, case, kind, method):
    reader = store(tmp_path, case, kind)
    cos = cosine_from_gram(gram_matrix(reader, BLOCK, plan_methods(reader, method)))
    assert (cos - oracle_cosine(case.gram)).abs().max().item() < COS_ATOL_FP16


SYMMETRY_LENGTHS = sorted(random.Random(0).randint(2, 30) for _ in range(40))  # length-sorted, as extract stores them
SYMMETRY_BLOCK = 16  # 40 pieces: diagonal and off-diagonal block pairs


@pytest.mark.parametrize("kind,method", [*EXACT_GRAMS, *[(k, "auto") for k in APPROX_KINDS]])
def test_gram_matrix_is_exactly_symmetric(tmp_path, kind, method):
    """GradSim(i, j) == GradSim(j, i) bit for bit. Blocks of 16 pieces of up to 30 positions: at this
    size a float32 factored product of a block with itself is not symmetric by itself."""
    reader = synthetic_store(tmp_path, [shape("t", 64, 64)], SYMMETRY_LENGTHS, kind=kind)
    G = gram_matrix(reader, SYMMETRY_BLOCK, plan_methods(reader, method))
    assert torch.equal(G, G.t())


def test_zero_gradient_has_cosine_zero():
    G = torch.tensor([[4.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(cosine_from_gram(G), torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))


# ---------------------------------------------------------------- squared norms and first-order terms


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_sq_norms_match_oracle_per_target(tmp_path, case, kind):
    reader = store(tmp_path, case, kind)
    for name in case.names:
        got = reader.to_piece_order(reader.kind.sq_norms(reader, 0, reader.n, name))
        ref = torch.tensor([float((g[name] ** 2).sum()) for g in case.grads], dtype=torch.float64)
        assert torch.allclose(got, ref, rtol=SQ_NORM_RTOL_FP16), name


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_gram_diagonal_matches_oracle(tmp_path, case, kind):
    reader = store(tmp_path, case, kind)
    got = reader.to_piece_order(gram_diagonal(reader, BLOCK))
    assert torch.allclose(got, case.gram.diagonal(), rtol=SQ_NORM_RTOL_FP16)


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_first_order_matches_oracle(tmp_path, case, kind):
    reader = store(tmp_path, case, kind)
    deltas = random_deltas(case)
    got = first_order(reader, deltas, block_size=BLOCK)
    ref = oracle_first_order(case.grads, deltas)
    delta_norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in deltas.values()))
    scale = case.flat.norm(dim=1) * delta_norm
    assert ((got - ref).abs() <= FIRST_ORDER_ATOL_FP16 * scale).all(), ((got - ref) / scale)
    rows = list(range(0, len(case.grads), 3))  # some pieces only: the same values there, NaN elsewhere
    some = first_order(reader, deltas, block_size=BLOCK, rows=rows)
    assert ((some[rows] - got[rows]).abs() <= 1e-6 * scale[rows]).all() and some.isnan().sum() == len(case.grads) - len(rows)


@pytest.fixture(scope="module")
def approx_readers(tmp_path_factory, case):
    """{kind: one reader per projection seed} for every approximate store kind."""
    root = tmp_path_factory.mktemp("approx")
    return {kind: [store(root / f"{kind}-{s}", case, kind, seed=s) for s in range(APPROX_SEEDS)] for kind in APPROX_KINDS}


@pytest.mark.parametrize("kind", APPROX_KINDS)
def test_approximate_first_order_is_unbiased_over_seeds(case, approx_readers, kind):
    deltas = random_deltas(case)
    est = torch.stack([first_order(r, deltas, block_size=BLOCK) for r in approx_readers[kind]])
    assert_unbiased(est, oracle_first_order(case.grads, deltas))


@pytest.mark.parametrize("kind", APPROX_KINDS)
def test_approximate_sq_norms_are_unbiased_over_seeds(case, approx_readers, kind):
    est = torch.stack([r.to_piece_order(gram_diagonal(r, BLOCK)) for r in approx_readers[kind]])
    assert_unbiased(est, case.gram.diagonal())


# ---------------------------------------------------------------- fp16 range


def tiny_factors(case) -> list[PieceFactors]:
    """The case's factors with every output gradient scaled by TINY_SCALE (copies)."""
    out = [PieceFactors(dict(f.x), {n: d * TINY_SCALE for n, d in f.d.items()}, f.logprob, dict(f.sq_norm))
           for f in case.factors]
    assert max(d.abs().max().item() for f in out for d in f.d.values()) < torch.finfo(torch.float16).tiny
    return out


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_tiny_gradients_keep_their_cosines(tmp_path, case, kind):
    reader = store(tmp_path, case, kind, factors=tiny_factors(case))
    cos = cosine_from_gram(gram_matrix(reader, BLOCK, plan_methods(reader)))
    assert (cos - oracle_cosine(case.gram)).abs().max().item() < COS_ATOL_FP16


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_tiny_gradients_keep_their_norms(tmp_path, case, kind):
    reader = store(tmp_path, case, kind, factors=tiny_factors(case))
    got = reader.to_piece_order(gram_diagonal(reader, BLOCK))
    assert torch.allclose(got, case.gram.diagonal() * TINY_SCALE**2, rtol=SQ_NORM_RTOL_FP16)


# ---------------------------------------------------------------- top-k


@pytest.fixture
def full_and_topk(tmp_path, case):
    """(full cosine matrix with -2 on the diagonal, top-k indices, top-k cosines) of one store."""
    reader = write_store(tmp_path, case.targets, case.factors, order=list(range(N_PIECES - 1, -1, -1)))
    methods = plan_methods(reader)
    cos = cosine_from_gram(gram_matrix(reader, BLOCK, methods))
    idx, vals = topk_cosine(reader, TOP_K, BLOCK, methods)
    return cos.fill_diagonal_(-2), idx, vals


def test_topk_indices_are_the_full_matrix_nearest_neighbours(full_and_topk):
    cos, idx, _ = full_and_topk
    assert torch.equal(idx, cos.topk(TOP_K, dim=1).indices)


def test_topk_cosines_equal_the_full_matrix_entries(full_and_topk):
    cos, _, vals = full_and_topk
    assert torch.allclose(vals.double(), cos.topk(TOP_K, dim=1).values, atol=TOPK_COS_ATOL)


def records(n: int) -> list[PieceRecord]:
    return [PieceRecord(index=i, id=f"p{i}", question_id=f"q{i}", owners=[f"q{i}"], kind="single_hop", prompt="x",
                        answer=f"a{i}", n_prompt_tokens=1, n_answer_tokens=1, n_inputs=1, logprob=0.0, sq_norm={},
                        shard=0) for i in range(n)]


# piece 0's nearest is 1, piece 1's is 0 (the same pair twice), piece 2's is 0 (found from 2's side only)
ONE_SIDED_IDX = torch.tensor([[1], [0], [0]])
ONE_SIDED_COS = torch.tensor([[0.9], [0.9], [0.8]])


def test_topk_pairs_keep_a_pair_found_from_one_side_only():
    rows = topk_pairs(ONE_SIDED_IDX, ONE_SIDED_COS, records(3), top=10)
    assert ("p0", "p2") in [(r.id_a, r.id_b) for r in rows]


def test_topk_pairs_list_each_unordered_pair_once():
    rows = topk_pairs(ONE_SIDED_IDX, ONE_SIDED_COS, records(3), top=10)
    assert [{r.id_a, r.id_b} for r in rows].count({"p0", "p1"}) == 1


def test_neighbour_pairs_are_unordered_and_distinct():
    i, j, _ = neighbour_pairs(ONE_SIDED_IDX, ONE_SIDED_COS)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2)]


# ---------------------------------------------------------------- damaged shards


def test_damaged_shard_is_an_artifact_error_naming_the_file(tmp_path, case):
    store(tmp_path, case)
    with open(RunDir(tmp_path).gradients.shard_path(1), "ab") as fh:
        fh.write(b"x")
    with pytest.raises(ArtifactError, match="shard-00001.pt"):
        GradientReader(RunDir(tmp_path))


def test_missing_shard_is_an_artifact_error_naming_the_file(tmp_path, case):
    store(tmp_path, case)
    RunDir(tmp_path).gradients.shard_path(2).unlink()
    with pytest.raises(ArtifactError, match="shard-00002.pt"):
        GradientReader(RunDir(tmp_path))


# ---------------------------------------------------------------- cost model (synthetic factors)


def synthetic_store(root, shapes: list[TargetShape], lengths: list[int], kind="factors") -> GradientReader:
    """A store of random factors, piece i with ``lengths[i]`` positions, in the given (store) order."""
    g = torch.Generator().manual_seed(0)
    factors = []
    for T in lengths:
        x = {s.name: torch.randn(T, s.d_in_aug, generator=g) for s in shapes}
        d = {s.name: torch.randn(T, s.d_out, generator=g) for s in shapes}
        factors.append(PieceFactors(x, d, 0.0, {s.name: float(((d[s.name].t() @ x[s.name]) ** 2).sum()) for s in shapes}))
    return write_store(root, shapes, factors, store=kind, shard_size=4)


def shape(name: str, d_in: int, d_out: int) -> TargetShape:
    return TargetShape(name=name, d_in=d_in, d_out=d_out, bias=False, n_params=d_in * d_out)


WIDE = shape("wide", 512, 512)   # T^2 (d_in + d_out) << d_in d_out for short pieces
NARROW = shape("narrow", 4, 4)   # d_in d_out < T^2 for all but single-token pieces
SHORT, LONG = 4, 256             # positions per piece
WIDE_2K = shape("wide2k", 2048, 2048)  # loaded factors outweigh the pair scratch


def test_plan_uses_factored_products_for_short_pieces_on_a_wide_target(tmp_path):
    reader = synthetic_store(tmp_path, [WIDE, NARROW], [SHORT] * 8)
    assert plan_methods(reader)["wide"] == "factored"


def test_plan_uses_dense_products_for_a_narrow_target(tmp_path):
    reader = synthetic_store(tmp_path, [WIDE, NARROW], [SHORT] * 8)
    assert plan_methods(reader)["narrow"] == "dense"


def test_plan_uses_dense_products_for_long_pieces(tmp_path):
    reader = synthetic_store(tmp_path, [shape("mid", 64, 64)], [LONG] * 2)
    assert plan_methods(reader) == {"mid": "dense"}


@pytest.mark.parametrize("method", ["factored", "dense"])
def test_requested_method_overrides_the_cost_model(tmp_path, method):
    reader = synthetic_store(tmp_path, [WIDE, NARROW], [SHORT] * 8)
    assert plan_methods(reader, method) == {"wide": method, "narrow": method}


@pytest.mark.parametrize("kind", [k for k in sorted(STORES) if k != "factors"])
def test_stores_without_factors_plan_dense_products(tmp_path, kind):
    reader = synthetic_store(tmp_path, [WIDE], [SHORT] * 4, kind=kind)
    assert plan_methods(reader, "factored") == {"wide": "dense"}


# ---------------------------------------------------------------- memory bound

REQUESTED_BLOCK = 8  # pieces per block asked for; fit_block_size may only lower it


def loaded_bytes(reader: GradientReader, methods: dict[str, str], start: int, stop: int) -> int:
    """Bytes of rows [start, stop) as actually loaded for the Gram product, all targets."""
    return sum(reader.kind.load_block(reader, start, stop, n, m).nbytes() for n, m in methods.items())


def largest_block_bytes(reader: GradientReader, methods: dict[str, str], block_size: int) -> int:
    return max(loaded_bytes(reader, methods, k, min(reader.n, k + block_size)) for k in range(0, reader.n, block_size))


def test_ample_memory_keeps_the_block_size(tmp_path, case):
    reader = store(tmp_path, case)
    assert fit_block_size(reader, plan_methods(reader), REQUESTED_BLOCK, AMPLE_MEMORY) == REQUESTED_BLOCK


def test_tight_memory_lowers_the_block_size(tmp_path, case):
    reader = store(tmp_path, case)
    methods = plan_methods(reader)
    budget = 2 * largest_block_bytes(reader, methods, REQUESTED_BLOCK)  # two such blocks need all of it, not half
    assert fit_block_size(reader, methods, REQUESTED_BLOCK, budget) < REQUESTED_BLOCK


def test_gram_under_tight_memory_matches_oracle(tmp_path, case):
    reader = store(tmp_path, case)
    methods = plan_methods(reader)
    budget = 2 * largest_block_bytes(reader, methods, REQUESTED_BLOCK)
    G = gram_matrix(reader, fit_block_size(reader, methods, REQUESTED_BLOCK, budget), methods, max_memory=budget)
    assert (cosine_from_gram(G) - oracle_cosine(case.gram)).abs().max().item() < COS_ATOL_FP16


def test_every_block_of_the_fitted_size_fits_in_memory(tmp_path):
    """Blocks are sized by their longest pieces, not the mean: 14 one-token pieces and two of 64
    (store order is length-sorted, so both long ones share the last block). The budget holds two
    blocks of 8 mean-length pieces in half of it, but not two copies of the last block of 8."""
    reader = synthetic_store(tmp_path, [WIDE_2K], [1] * 14 + [64] * 2)
    methods = {WIDE_2K.name: "factored"}
    budget = 3 * largest_block_bytes(reader, methods, REQUESTED_BLOCK)
    bs = fit_block_size(reader, methods, REQUESTED_BLOCK, budget)
    assert 2 * largest_block_bytes(reader, methods, bs) <= budget / 2
