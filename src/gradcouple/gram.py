"""Gram matrices of per-example gradients, block by block, from gradient shards.

Inner products over several targets add; each target's block product comes from its store
kind (:meth:`~gradcouple.stores.Block.inner`), summed in float64. Symmetric block pairs are
computed once; the block size is lowered until two loaded blocks and their scratch fit in half
the memory budget, and the other half caches loaded blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterator, Optional

import torch

from .stores import Block, GradientReader


class BlockLoader:
    """Loads rows [start, stop) of every target as blocks, keeping recent ones up to ``cache_bytes``."""

    def __init__(self, reader: GradientReader, methods: dict[str, str], cache_bytes: float = 0):
        self.reader, self.methods, self.cache_bytes = reader, methods, cache_bytes
        self._cache: OrderedDict[tuple[int, int], tuple[dict[str, Block], int]] = OrderedDict()
        self._held = 0

    def load(self, start: int, stop: int) -> dict[str, Block]:
        key = (start, stop)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key][0]
        out = {n: self.reader.kind.load_block(self.reader, start, stop, n, m) for n, m in self.methods.items()}
        size = sum(b.nbytes() for b in out.values())
        if size <= self.cache_bytes:
            self._cache[key] = (out, size)
            self._held += size
            while self._held > self.cache_bytes:
                _, (_, sz) = self._cache.popitem(last=False)
                self._held -= sz
        return out


def plan_methods(reader: GradientReader, method: str = "auto", block_size: int = 256) -> dict[str, str]:
    """Target -> Gram algorithm ('factored' or 'dense'), chosen by the store kind's cost model."""
    tokens = reader.tokens()
    T = sum(tokens) / max(1, len(tokens))
    return {n: reader.kind.plan(n, T, block_size, method) for n in reader.names}


def fit_block_size(reader: GradientReader, methods: dict[str, str], block_size: int, budget: float) -> int:
    """Largest block size <= ``block_size`` whose two loaded blocks and pair scratch fit in half of ``budget`` bytes.

    The token count of a block is that of the longest run of ``block_size`` consecutive store rows
    (rows are length-sorted, so the last block holds the longest pieces).
    """
    tokens = reader.tokens()
    while block_size > 1:
        longest = max((sum(tokens[k:k + block_size]) for k in range(0, len(tokens), block_size)), default=1)
        loaded = scratch = 0.0
        for n, m in methods.items():
            ld, sc = reader.kind.block_bytes(n, block_size, longest / block_size, m)
            loaded, scratch = loaded + ld, max(scratch, sc)
        if 2 * loaded + scratch <= budget / 2:
            break
        block_size //= 2
    return block_size


def _upper_block_pairs(loader: BlockLoader, n: int, block_size: int) -> Iterator[tuple[tuple[int, int], tuple[int, int], torch.Tensor]]:
    """((i0, i1), (j0, j1), Gram block (i1-i0, j1-j0) float64) for every block pair with j0 >= i0.

    Diagonal blocks are symmetrised: a float32 product of a block with itself is symmetric only
    up to rounding, and GradSim(i, j) must equal GradSim(j, i) exactly.
    """
    starts = list(range(0, n, block_size))
    for bi, i0 in enumerate(starts):
        i1 = min(n, i0 + block_size)
        a = loader.load(i0, i1)
        for j0 in starts[bi:]:
            j1 = min(n, j0 + block_size)
            b = a if j0 == i0 else loader.load(j0, j1)
            blk = sum(a[name].inner(b[name]) for name in a)
            if j0 == i0:
                blk = (blk + blk.t()) / 2
            yield (i0, i1), (j0, j1), blk


def n_block_pairs(n: int, block_size: int) -> int:
    """How many block pairs :func:`gram_matrix` / :func:`topk_cosine` compute (the progress total)."""
    b = -(-n // block_size)
    return b * (b + 1) // 2


def gram_matrix(reader: GradientReader, block_size: int, methods: dict[str, str],
                progress: Optional[Callable[[int], None]] = None, max_memory: float = 4 * 2**30) -> torch.Tensor:
    """Full (N, N) float64 Gram matrix <g_i, g_j> in pieces.jsonl order (not store order).

    ``block_size`` must already fit ``max_memory`` bytes (:func:`fit_block_size`); ``progress(k)``
    is called with the number of block pairs done.
    """
    n = reader.n
    loader = BlockLoader(reader, methods, cache_bytes=max_memory / 2 - 8 * n**2)
    G = torch.zeros(n, n, dtype=torch.float64)
    for (i0, i1), (j0, j1), blk in _upper_block_pairs(loader, n, block_size):
        G[i0:i1, j0:j1] = blk
        G[j0:j1, i0:i1] = blk.t()
        if progress:
            progress(1)
    order = torch.tensor(reader.order)
    out = torch.empty_like(G)
    out[order[:, None], order[None, :]] = G
    return out


def gram_diagonal(reader: GradientReader, block_size: int = 256) -> torch.Tensor:
    """(N,) float64 squared norms |g_i|^2 from the stored (fp16) data, in store order."""
    out = torch.zeros(reader.n, dtype=torch.float64)
    for i0 in range(0, reader.n, block_size):
        i1 = min(reader.n, i0 + block_size)
        for name in reader.names:
            out[i0:i1] += reader.kind.sq_norms(reader, i0, i1, name)
    return out


def topk_cosine(reader: GradientReader, k: int, block_size: int, methods: dict[str, str],
                progress: Optional[Callable[[int], None]] = None, max_memory: float = 4 * 2**30) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar other pieces per piece without forming the N x N matrix.

    Returns (indices (N, k) int64, cosines (N, k) float32), rows and indices in pieces.jsonl
    order, cosines sorted descending. Each symmetric block pair is computed once and merged into
    the running top-k of both its row and its column pieces.
    """
    n = reader.n
    loader = BlockLoader(reader, methods, cache_bytes=max_memory / 2 - 16 * k * n)
    k = min(k, n - 1)
    norms = gram_diagonal(reader, block_size).sqrt().clamp_min(1e-300)
    best_v = torch.full((n, k), -float("inf"), dtype=torch.float64)
    best_i = torch.zeros((n, k), dtype=torch.long)

    def merge(r0: int, r1: int, vals: torch.Tensor, c0: int) -> None:
        cols = torch.arange(c0, c0 + vals.shape[1]).expand(vals.shape[0], -1)
        v, pos = torch.cat([best_v[r0:r1], vals], 1).topk(k, dim=1)
        best_i[r0:r1] = torch.cat([best_i[r0:r1], cols], 1).gather(1, pos)
        best_v[r0:r1] = v

    for (i0, i1), (j0, j1), blk in _upper_block_pairs(loader, n, block_size):
        cos = blk / (norms[i0:i1, None] * norms[None, j0:j1])
        if j0 == i0:
            cos.fill_diagonal_(-float("inf"))
        merge(i0, i1, cos, j0)
        if j0 != i0:
            merge(j0, j1, cos.t(), i0)
        if progress:
            progress(1)
    order = torch.tensor(reader.order)
    idx_out = torch.empty(n, k, dtype=torch.long)
    cos_out = torch.empty(n, k, dtype=torch.float32)
    idx_out[order] = order[best_i]
    cos_out[order] = best_v.float()
    return idx_out, cos_out


def cosine_from_gram(G: torch.Tensor) -> torch.Tensor:
    """GradSim from a Gram matrix: G_ij / sqrt(G_ii G_jj), float64; a zero gradient gives cosine 0."""
    n = G.diagonal().clamp_min(0).sqrt()
    denom = n[:, None] * n[None, :]
    return torch.where(denom > 0, G / denom.clamp_min(1e-300), torch.zeros_like(G))


def first_order(reader: GradientReader, deltas: dict[str, torch.Tensor], block_size: int = 256) -> torch.Tensor:
    """<g_j, Delta theta> for every piece j: (N,) float64 in pieces.jsonl order.

    ``deltas`` maps each target to its (d_out, d_in') weight change; the store kind contracts it
    with the stored data (exactly for factors and dense, an unbiased estimate for projected).
    """
    out = torch.zeros(reader.n, dtype=torch.float64)
    for i0 in range(0, reader.n, block_size):
        i1 = min(reader.n, i0 + block_size)
        for name in reader.names:
            out[i0:i1] += reader.kind.first_order(reader, i0, i1, name, deltas[name].float().cpu())
    return reader.to_piece_order(out)
