"""Gram matrices of per-example gradients, block by block, from gradient shards.

Inner products over several targets add; each target's block product comes from its store
kind (:meth:`~gradcouple.stores.Block.inner`), summed in float64. Symmetric block pairs are
computed once; the block size is lowered until two loaded blocks and their scratch fit in half
the memory budget, and the other half caches loaded blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterator, Optional, Sequence

import torch

from .artifacts import LayerContributions, PairLayers
from .stores import Block, Direction, GradientReader


class BlockLoader:
    """Loads rows [start, stop) of every target as blocks, keeping recent ones up to ``cache_bytes``
    (on ``device`` when given, e.g. a GPU: the block products then run there)."""

    def __init__(self, reader: GradientReader, methods: dict[str, str], cache_bytes: float = 0,
                 device: Optional[torch.device] = None):
        self.reader, self.methods, self.cache_bytes, self.device = reader, methods, cache_bytes, device
        if device is not None and device.type == "cuda":  # the cache lives on the GPU: at most half of its memory
            self.cache_bytes = min(cache_bytes, torch.cuda.get_device_properties(device).total_memory / 2)
        self._cache: OrderedDict[tuple[int, int], tuple[dict[str, Block], int]] = OrderedDict()
        self._held = 0

    def load(self, start: int, stop: int) -> dict[str, Block]:
        key = (start, stop)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key][0]
        out = {n: self.reader.kind.load_block(self.reader, start, stop, n, m) for n, m in self.methods.items()}
        if self.device is not None:
            out = {n: b.to(self.device) for n, b in out.items()}
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


class LayerParts:
    """Accumulates each target layer's contribution to GradSim (``DEFINITIONS['layer contribution']``)
    over every off-diagonal pair, each unordered pair once, while the Gram blocks are computed.

    ``norms``: (N,) float64 |g_i| over all targets, in store order (:func:`gram_diagonal`); a zero
    gradient contributes 0, as its GradSim is 0.
    """

    def __init__(self, names: list[str], norms: torch.Tensor):
        self.names, self.norms = list(names), norms
        self.signed = torch.zeros(len(self.names), dtype=torch.float64)
        self.absolute = torch.zeros(len(self.names), dtype=torch.float64)
        self.n_pairs = 0
        self._scale: tuple[tuple[int, int, int, int], torch.Tensor] | None = None

    @classmethod
    def of(cls, reader: GradientReader, block_size: int = 256) -> "LayerParts":
        """An empty accumulator for ``reader``'s targets (reads every piece's squared norm once)."""
        return cls(reader.names, gram_diagonal(reader, block_size).clamp_min(0).sqrt())

    def contributions(self, i0: int, j0: int, part: torch.Tensor) -> torch.Tensor:
        """One target's (bi, bj) block of <g_i, g_j>_layer (store rows from i0, j0) divided by |g_i| |g_j|."""
        key = (i0, j0, *part.shape)
        if self._scale is None or self._scale[0] != key:  # one scale per block pair, shared by its targets
            denom = self.norms[i0:i0 + part.shape[0], None] * self.norms[None, j0:j0 + part.shape[1]]
            self._scale = key, torch.where(denom > 0, 1 / denom.clamp_min(1e-300), torch.zeros_like(denom))
        return part * self._scale[1]

    def add(self, name: str, i0: int, j0: int, part: torch.Tensor) -> None:
        """Add one target's block; on a diagonal block (i0 == j0) only the pairs above the diagonal count."""
        k = self.names.index(name)
        c = self.contributions(i0, j0, part)
        if i0 == j0:
            c = ((c + c.t()) / 2).triu(1)
        self.signed[k] += c.sum()
        self.absolute[k] += c.abs().sum()

    def count(self, i0: int, i1: int, j0: int, j1: int) -> None:
        """Count the pairs of one block pair (call once per block pair, not per target)."""
        b = i1 - i0
        self.n_pairs += b * (b - 1) // 2 if i0 == j0 else b * (j1 - j0)


def _upper_block_pairs(loader: BlockLoader, n: int, block_size: int, layers: Optional[LayerParts] = None,
                       only: Optional[set[int]] = None) -> Iterator[tuple[tuple[int, int], tuple[int, int], torch.Tensor]]:
    """((i0, i1), (j0, j1), Gram block (i1-i0, j1-j0) float64) for every block pair with j0 >= i0.

    Diagonal blocks are symmetrised: a float32 product of a block with itself is symmetric only
    up to rounding, and GradSim(i, j) must equal GradSim(j, i) exactly. ``layers``, when given,
    receives every target's block before they are summed. ``only``: the block rows (indices of
    the blocks i) to compute, a torchrun rank's share; all when None. Blocks come back on the CPU.
    """
    starts = list(range(0, n, block_size))
    for bi, i0 in enumerate(starts):
        if only is not None and bi not in only:
            continue
        i1 = min(n, i0 + block_size)
        a = loader.load(i0, i1)
        for j0 in starts[bi:]:
            j1 = min(n, j0 + block_size)
            b = a if j0 == i0 else loader.load(j0, j1)
            blk = 0
            for name in a:
                part = a[name].inner(b[name]).cpu()
                if layers is not None:
                    layers.add(name, i0, j0, part)
                blk = blk + part
            if layers is not None:
                layers.count(i0, i1, j0, j1)
            if j0 == i0:
                blk = (blk + blk.t()) / 2
            yield (i0, i1), (j0, j1), blk


def layer_contributions(reader: GradientReader, methods: dict[str, str], layers: LayerParts,
                        pairs: list[tuple[int, int, float]]) -> LayerContributions:
    """The per-layer split of the Gram: ``layers``' averages, and each of ``pairs`` split by target.

    ``pairs``: (i, j, GradSim) with i, j pieces.jsonl indices, e.g. the top rows of pairs.csv.
    Each pair's per-target inner products are computed from one-row blocks of the two pieces,
    so this reads 2 * len(pairs) rows at most. Contributions are dimensionless (GradSim units).
    """
    recs = reader.manifest.records()
    row = {p: r for r, p in enumerate(reader.order)}
    cache: dict[int, dict[str, Block]] = {}

    def blocks(p: int) -> dict[str, Block]:
        if p not in cache:
            r = row[p]
            cache[p] = {n: reader.kind.load_block(reader, r, r + 1, n, methods[n]) for n in reader.names}
        return cache[p]

    top = []
    for i, j, cos in sorted(pairs, key=lambda t: (row[t[0]], row[t[1]])):
        a, b = blocks(i), blocks(j)
        parts = [float(layers.contributions(row[i], row[j], a[n].inner(b[n]))) for n in reader.names]
        top.append((i, j, PairLayers(id_a=recs[i].id, id_b=recs[j].id, cosine=cos, contribution=parts)))
    order = {(i, j): k for k, (i, j, _) in enumerate(pairs)}
    n = max(layers.n_pairs, 1)
    mean_abs = (layers.absolute / n).tolist()
    total = sum(mean_abs)
    return LayerContributions(names=list(layers.names), n_pairs=layers.n_pairs,
                              mean_contribution=(layers.signed / n).tolist(), mean_abs_contribution=mean_abs,
                              abs_share=[v / total if total > 0 else 0.0 for v in mean_abs],
                              top_pairs=[p for _, _, p in sorted(top, key=lambda t: order[(t[0], t[1])])])


def n_block_pairs(n: int, block_size: int) -> int:
    """How many block pairs :func:`gram_matrix` / :func:`topk_cosine` compute (the progress total)."""
    b = -(-n // block_size)
    return b * (b + 1) // 2


def gram_matrix(reader: GradientReader, block_size: int, methods: dict[str, str],
                progress: Optional[Callable[[int], None]] = None, max_memory: float = 4 * 2**30,
                layers: Optional[LayerParts] = None, share=None, device: Optional[torch.device] = None) -> torch.Tensor:
    """Full (N, N) float64 Gram matrix <g_i, g_j> in pieces.jsonl order (not store order).

    ``block_size`` must already fit ``max_memory`` bytes (:func:`fit_block_size`); ``progress(k)``
    is called with the number of block pairs done; ``layers`` accumulates the per-target parts.
    ``device``: where the block products run (default the CPU). ``share``: a torchrun rank's
    :class:`~gradcouple.distributed.GramShare`; the rank computes its block rows and rank 0
    returns the whole matrix (the other ranks' return values are partial).
    """
    n = reader.n
    loader = BlockLoader(reader, methods, cache_bytes=max_memory / 2 - 8 * n**2, device=device)
    G = torch.zeros(n, n, dtype=torch.float64)
    for (i0, i1), (j0, j1), blk in _upper_block_pairs(loader, n, block_size, layers, share.rows if share else None):
        G[i0:i1, j0:j1] = blk
        G[j0:j1, i0:i1] = blk.t()
        if progress:
            progress(1)
    if share is not None:
        share.sum_to_main(G)
        if layers is not None:
            share.sum_layers(layers)
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
                progress: Optional[Callable[[int], None]] = None, max_memory: float = 4 * 2**30,
                layers: Optional[LayerParts] = None, share=None,
                device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar other pieces per piece without forming the N x N matrix.

    Returns (indices (N, k) int64, cosines (N, k) float32), rows and indices in pieces.jsonl
    order, cosines sorted descending. Each symmetric block pair is computed once and merged into
    the running top-k of both its row and its column pieces; ``layers`` accumulates the
    per-target parts of every pair (all of them, not only the kept ones). ``share`` and
    ``device`` as in :func:`gram_matrix`: under torchrun rank 0 returns the merged lists.
    """
    n = reader.n
    loader = BlockLoader(reader, methods, cache_bytes=max_memory / 2 - 16 * k * n, device=device)
    k = min(k, n - 1)
    norms = gram_diagonal(reader, block_size).sqrt().clamp_min(1e-300)
    best_v = torch.full((n, k), -float("inf"), dtype=torch.float64)
    best_i = torch.zeros((n, k), dtype=torch.long)

    def merge(r0: int, r1: int, vals: torch.Tensor, c0: int) -> None:
        cols = torch.arange(c0, c0 + vals.shape[1]).expand(vals.shape[0], -1)
        v, pos = torch.cat([best_v[r0:r1], vals], 1).topk(k, dim=1)
        best_i[r0:r1] = torch.cat([best_i[r0:r1], cols], 1).gather(1, pos)
        best_v[r0:r1] = v

    for (i0, i1), (j0, j1), blk in _upper_block_pairs(loader, n, block_size, layers, share.rows if share else None):
        cos = blk / (norms[i0:i1, None] * norms[None, j0:j1])
        if j0 == i0:
            cos.fill_diagonal_(-float("inf"))
        merge(i0, i1, cos, j0)
        if j0 != i0:
            merge(j0, j1, cos.t(), i0)
        if progress:
            progress(1)
    if share is not None:
        best_v, best_i = share.topk_to_main(best_v, best_i, k)
        if layers is not None:
            share.sum_layers(layers)
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


def contract(reader: GradientReader, directions: dict[str, Direction], block_size: int = 256,
             rows: Optional[Sequence[int]] = None, dtype: torch.dtype = torch.float32,
             progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """<g_j, D> for every stored piece j and a direction D given per target (a weight change, or an
    edit's gradient kept factored): (N,) float64 in pieces.jsonl order.

    Read block by block in store order, so memory is a block (and the reader's few cached shards);
    the store kind contracts each block (exactly for factors and dense, an unbiased estimate for
    projected), products in ``dtype``, sums in float64; a target whose direction is zero is not
    read. ``rows`` (pieces.jsonl indices) computes only those pieces, NaN elsewhere: blocks without
    one are not read, and the factors store contracts only their tokens. ``progress(k)``: called
    with the pieces done.
    """
    out = torch.zeros(reader.n, dtype=torch.float64)
    wanted = None
    if rows is not None:
        want = torch.zeros(reader.n, dtype=torch.bool)
        want[torch.tensor(list(rows), dtype=torch.long)] = True
        wanted = want[torch.tensor(reader.order, dtype=torch.long)]  # in store order
        out[~wanted] = float("nan")
    names = [n for n in reader.names if not directions[n].is_zero()]  # a one-layer edit reads one layer's data
    for i0 in range(0, reader.n, block_size):
        i1 = min(reader.n, i0 + block_size)
        keep = None if wanted is None else wanted[i0:i1]
        if keep is None or bool(keep.any()):
            for name in names:
                out[i0:i1] += reader.kind.contract(reader, i0, i1, name, directions[name], keep, dtype)
        if progress:
            progress(i1 - i0)
    return reader.to_piece_order(out)


def first_order(reader: GradientReader, deltas: dict[str, torch.Tensor], block_size: int = 256,
                rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """<g_j, Delta theta> for every piece j: (N,) float64 in pieces.jsonl order (:func:`contract`
    with each target's (d_out, d_in') weight change as a dense direction; NaN outside ``rows``)."""
    return contract(reader, {n: Direction(matrix=d.float().cpu()) for n, d in deltas.items()}, block_size, rows)
