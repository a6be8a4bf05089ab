"""Exact Gram matrices of per-example gradients, block by block, from gradient shards.

For the ``factors`` store, per target and pair of pieces (Frobenius inner product):

    <G_i, G_j> = sum( (X_i X_j^T) * (Delta_i Delta_j^T) )

computed for a whole block pair with two matmuls over the concatenated tokens and a segment
sum (the "ghost" inner product; Opacus uses its diagonal for per-example norms). It costs
T_i T_j (d_in + d_out) per pair against d_in d_out for materialised dense gradients, so the
method is chosen per target by that cost model. Inner products over several targets add;
blocks are summed in float64.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .store import GradientStore


@dataclass
class LayerPlan:
    """Which algorithm a target uses, and the cost-model figures (multiply-adds per pair)."""

    name: str
    method: str
    factored_cost: float
    dense_cost: float


def plan_layers(store: GradientStore, method: str = "auto", block_size: int = 256) -> list[LayerPlan]:
    """Choose factored vs dense per target for a ``factors`` store.

    Per pair: factored costs T^2 (d_in' + d_out + 1); dense costs d_in' d_out plus the
    materialisation of both blocks (2 T d_in' d_out / block_size, amortised).
    """
    T = store.mean_tokens()
    plans = []
    for t in store.targets:
        d_in = t["d_in"] + int(t["bias"])
        fc = T * T * (d_in + t["d_out"] + 1)
        dc = d_in * t["d_out"] * (1 + 2 * T / max(1, block_size))
        m = method if method != "auto" else ("factored" if fc <= dc else "dense")
        plans.append(LayerPlan(t["name"], m, fc, dc))
    return plans


def _segment_matrix(seg: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """(n, sum T) float32: row i holds scale_i at the tokens of piece i (a scaled one-hot)."""
    S = torch.zeros(n, seg.numel())
    S[seg, torch.arange(seg.numel())] = scale[seg]
    return S


def _dense_block(x: torch.Tensor, d: torch.Tensor, seg: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """Materialise G_i = Delta_i^T X_i for a block: (n, d_out * d_in') float32."""
    xf, df = x.float(), d.float()
    bounds = torch.searchsorted(seg, torch.arange(n + 1))
    out = torch.empty(n, d.shape[1] * x.shape[1])
    for i in range(n):
        a, b = bounds[i], bounds[i + 1]
        out[i] = (df[a:b].t() @ xf[a:b]).flatten() * scale[i]
    return out


class _BlockLoader:
    """Loads blocks of rows as float32 compute-ready data, keeping recent blocks up to ``cache_bytes``."""

    def __init__(self, store: GradientStore, plans: list[LayerPlan], cache_bytes: float = 0):
        self.store, self.plans, self.cache_bytes = store, plans, cache_bytes
        self._cache: OrderedDict[tuple[int, int], tuple[dict, int]] = OrderedDict()
        self._held = 0

    def load(self, start: int, stop: int) -> dict:
        key = (start, stop)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key][0]
        n = stop - start
        out = {}
        for p in self.plans:
            if self.store.store == "factors":
                x, d, seg, sc = self.store.factors(start, stop, p.name)
                if p.method == "dense":
                    out[p.name] = ("dense", _dense_block(x, d, seg, sc, n))
                else:
                    out[p.name] = ("factored", x.float(), d.float(), _segment_matrix(seg, sc, n))
            else:
                g, sc = self.store.matrices(start, stop, p.name)
                out[p.name] = ("dense", g.float().flatten(1) * sc[:, None])
        size = sum(t.numel() * t.element_size() for v in out.values() for t in v[1:])
        if size <= self.cache_bytes:
            self._cache[key] = (out, size)
            self._held += size
            while self._held > self.cache_bytes:
                _, (_, sz) = self._cache.popitem(last=False)
                self._held -= sz
        return out


def max_block_tokens(store: GradientStore, block_size: int) -> int:
    """Largest token total of any block of ``block_size`` consecutive store rows (rows are
    length-sorted, so the last block holds the longest pieces)."""
    tokens = [store.manifest["pieces"][i]["n_inputs"] for i in store.order]
    return max((sum(tokens[k:k + block_size]) for k in range(0, len(tokens), block_size)), default=1)


def block_bytes(store: GradientStore, plans: list[LayerPlan], block_size: int) -> tuple[float, float]:
    """Estimated bytes of the largest loaded block, and of the scratch for one block pair (float32)."""
    T = max_block_tokens(store, block_size) / block_size if store.store == "factors" else 1.0
    loaded = scratch = 0.0
    for p, t in zip(plans, store.targets):
        d_in = t["d_in"] + int(t["bias"])
        if store.store != "factors":
            k, m = store.manifest.get("proj_dim") or 0, store.manifest.get("proj_blocks") or 1
            loaded += block_size * (m * k * k if store.store == "projected" else d_in * t["d_out"]) * 4
        elif p.method == "dense":
            loaded += block_size * d_in * t["d_out"] * 4
        else:
            loaded += block_size * T * (d_in + t["d_out"] + block_size) * 4
            scratch = max(scratch, 3 * (block_size * T) ** 2 * 4)
    return loaded, scratch


def fit_block_size(store: GradientStore, plans: list[LayerPlan], block_size: int, budget: float) -> int:
    """Largest block size <= ``block_size`` whose two loaded blocks and pair scratch fit in half the budget."""
    while block_size > 1:
        loaded, scratch = block_bytes(store, plans, block_size)
        if 2 * loaded + scratch <= budget / 2:
            break
        block_size //= 2
    return block_size


def _block_product(a: dict, b: dict) -> torch.Tensor:
    total = None
    for name, va in a.items():
        vb = b[name]
        if va[0] == "dense":
            blk = (va[1] @ vb[1].t()).double()
        else:
            k = (va[1] @ vb[1].t()) * (va[2] @ vb[2].t())
            blk = (va[3] @ k @ vb[3].t()).double()
        total = blk if total is None else total + blk
    return total


def _upper_block_pairs(loader: _BlockLoader, N: int, block_size: int):
    """Yield ((i0, i1), (j0, j1), Gram block (i1-i0, j1-j0) float64) for every block pair with j0 >= i0."""
    starts = list(range(0, N, block_size))
    for bi, i0 in enumerate(starts):
        i1 = min(N, i0 + block_size)
        a = loader.load(i0, i1)
        for j0 in starts[bi:]:
            j1 = min(N, j0 + block_size)
            yield (i0, i1), (j0, j1), _block_product(a, a if j0 == i0 else loader.load(j0, j1))


def store_plans(store: GradientStore, method: str = "auto", block_size: int = 256) -> list[LayerPlan]:
    if store.store == "factors":
        return plan_layers(store, method, block_size)
    return [LayerPlan(n, "dense", 0.0, 0.0) for n in store.names]


def gram_matrix(store: GradientStore, block_size: int = 256, method: str = "auto",
                progress: Optional[Callable[[int], None]] = None, max_memory: float = 4 * 2**30) -> torch.Tensor:
    """Full (N, N) float64 Gram matrix in *pieces.jsonl order* (not store order).

    Symmetric blocks are computed once. ``block_size`` is lowered until two loaded blocks and
    their scratch fit in half of ``max_memory`` (bytes); the other half caches loaded blocks.
    ``progress(k)`` is called with the number of block pairs done.
    """
    plans = store_plans(store, method, block_size)
    block_size = fit_block_size(store, plans, block_size, max_memory)
    loader = _BlockLoader(store, plans, cache_bytes=max_memory / 2 - 8 * store.n**2)
    N = store.n
    G = torch.zeros(N, N, dtype=torch.float64)
    for (i0, i1), (j0, j1), blk in _upper_block_pairs(loader, N, block_size):
        G[i0:i1, j0:j1] = blk
        G[j0:j1, i0:i1] = blk.t()
        if progress:
            progress(1)
    order = torch.tensor(store.order)
    out = torch.empty_like(G)
    out[order[:, None], order[None, :]] = G
    return out


def gram_diagonal(store: GradientStore, block_size: int = 256) -> torch.Tensor:
    """(N,) float64 squared norms |G_i|^2 from the stored (fp16) data, in store order."""
    plans = store_plans(store, "factored" if store.store == "factors" else "dense", block_size)
    out = torch.zeros(store.n, dtype=torch.float64)
    for i0 in range(0, store.n, block_size):
        i1 = min(store.n, i0 + block_size)
        for p in plans:
            if store.store == "factors":
                x, d, seg, sc = store.factors(i0, i1, p.name)
                x, d = x.double(), d.double()
                bounds = torch.searchsorted(seg, torch.arange(i1 - i0 + 1))
                for k in range(i1 - i0):
                    a, b = bounds[k], bounds[k + 1]
                    out[i0 + k] += ((x[a:b] @ x[a:b].t()) * (d[a:b] @ d[a:b].t())).sum() * float(sc[k]) ** 2
            else:
                g, sc = store.matrices(i0, i1, p.name)
                out[i0:i1] += (g.double().flatten(1) ** 2).sum(1) * sc.double() ** 2
    return out


def topk_cosine(store: GradientStore, k: int, block_size: int = 256, method: str = "auto",
                progress: Optional[Callable[[int], None]] = None, max_memory: float = 4 * 2**30) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar other pieces per piece without forming the N x N matrix.

    Returns (indices (N, k) int64, cosines (N, k) float32), rows and indices in pieces.jsonl
    order, cosines sorted descending. Each symmetric block pair is computed once and merged
    into the running top-k of both its row and its column pieces. Memory: the running top-k
    (N, k), two blocks of shard data and their scratch (block size lowered to fit half of
    ``max_memory`` bytes), and a cache of loaded blocks in the other half.
    """
    plans = store_plans(store, method, block_size)
    block_size = fit_block_size(store, plans, block_size, max_memory)
    loader = _BlockLoader(store, plans, cache_bytes=max_memory / 2 - 16 * k * store.n)
    N = store.n
    k = min(k, N - 1)
    norms = gram_diagonal(store, block_size).sqrt().clamp_min(1e-300)
    best_v = torch.full((N, k), -float("inf"), dtype=torch.float64)
    best_i = torch.zeros((N, k), dtype=torch.long)

    def merge(r0: int, r1: int, vals: torch.Tensor, c0: int) -> None:
        cols = torch.arange(c0, c0 + vals.shape[1]).expand(vals.shape[0], -1)
        v, pos = torch.cat([best_v[r0:r1], vals], 1).topk(k, dim=1)
        best_i[r0:r1] = torch.cat([best_i[r0:r1], cols], 1).gather(1, pos)
        best_v[r0:r1] = v

    for (i0, i1), (j0, j1), blk in _upper_block_pairs(loader, N, block_size):
        cos = blk / (norms[i0:i1, None] * norms[None, j0:j1])
        if j0 == i0:
            cos.fill_diagonal_(-float("inf"))
        merge(i0, i1, cos, j0)
        if j0 != i0:
            merge(j0, j1, cos.t(), i0)
        if progress:
            progress(1)
    order = torch.tensor(store.order)
    idx_out = torch.empty(N, k, dtype=torch.long)
    cos_out = torch.empty(N, k, dtype=torch.float32)
    idx_out[order] = order[best_i]
    cos_out[order] = best_v.float()
    return idx_out, cos_out


def cosine_from_gram(G: torch.Tensor) -> torch.Tensor:
    """GradSim: G_ij / sqrt(G_ii G_jj), float64; a zero gradient gives cosine 0."""
    n = G.diagonal().clamp_min(0).sqrt()
    denom = n[:, None] * n[None, :]
    return torch.where(denom > 0, G / denom.clamp_min(1e-300), torch.zeros_like(G))
