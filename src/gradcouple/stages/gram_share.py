"""couple under ``torchrun``: the block rows of the Gram dealt to the ranks, and how their parts meet.

The block rows are dealt by token products (the factored cost of a block pair is
T_i T_j (d_in + d_out)); each rank computes its block pairs; rank 0 receives the sum of the parts
(full matrix) or every rank's top-k lists, merges them and writes the same files as one process.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ranks import balance, barrier, decide, is_main, rank, world_size


class GramShare:
    """This rank's block rows of the Gram and how the parts meet on rank 0.

    ``block_size``, ``top_k`` and ``methods`` are rank 0's (machines may differ in memory);
    ``rows`` are the block-row indices (block i = store rows [i*block_size, (i+1)*block_size))
    whose block pairs (i, j >= i) this rank computes; ``n_pairs`` counts them.
    """

    def __init__(self, rows: set[int], n_pairs: int, block_size: int, top_k: Optional[int], methods: dict[str, str]):
        self.rows, self.n_pairs = rows, n_pairs
        self.block_size, self.top_k, self.methods = block_size, top_k, methods
        self.main = is_main()

    def sum_to_main(self, t: torch.Tensor) -> None:
        """Rank 0's ``t`` becomes the sum of every rank's (each Gram entry is computed by one rank
        and zero elsewhere, so the sum is exact)."""
        import torch.distributed as dist  # deferred: torch.distributed, only under torchrun

        dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)

    def sum_layers(self, layers) -> None:
        """Rank 0's per-layer accumulators (:class:`~gradcouple.gram.LayerParts`) become the job's."""
        import torch.distributed as dist  # deferred: torch.distributed, only under torchrun

        count = torch.tensor([float(layers.n_pairs)], dtype=torch.float64)
        for t in (layers.signed, layers.absolute, count):
            dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)
        layers.n_pairs = int(count.item())

    def topk_to_main(self, best_v: torch.Tensor, best_i: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's running top-k per row (values float64, indices; store order) merged on rank 0.

        Each pair was offered to one rank only, so the merge is the top k of the union.
        """
        import torch.distributed as dist  # deferred: torch.distributed, only under torchrun

        vs = [torch.empty_like(best_v) for _ in range(world_size())] if self.main else None
        ids = [torch.empty_like(best_i) for _ in range(world_size())] if self.main else None
        dist.gather(best_v.contiguous(), vs, dst=0)
        dist.gather(best_i.contiguous(), ids, dst=0)
        if not self.main:
            return best_v, best_i
        v, pos = torch.cat(vs, 1).topk(k, dim=1)
        return v, torch.cat(ids, 1).gather(1, pos)

    def done(self) -> None:
        """Rank 0 has written every output (a barrier)."""
        barrier()


def gram_share(reader, block_size: int, top_k: Optional[int], methods: dict[str, str]) -> Optional[GramShare]:
    """This rank's share of couple's block pairs under torchrun (None in one process).

    Block row i costs about T_i * sum_{j >= i} T_j (T: tokens of a block; the factored product
    of a block pair is T_i T_j (d_in + d_out)), and the rows are dealt by :func:`balance`.
    """
    if world_size() == 1:
        return None
    block_size, top_k, methods = decide(lambda: (block_size, top_k, dict(methods)))
    tokens = reader.tokens()
    T = [float(sum(tokens[s:s + block_size])) for s in range(0, reader.n, block_size)]
    tail = [sum(T[i:]) for i in range(len(T))]
    rows = set(balance([T[i] * tail[i] for i in range(len(T))], world_size())[rank()])
    n_pairs = sum(len(T) - i for i in rows)
    return GramShare(rows, n_pairs, block_size, top_k, methods)


__all__ = ["GramShare", "gram_share"]
