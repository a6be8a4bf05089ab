"""``dense`` (exact, small models only): G = Delta^T X per piece and target, (d_out, d_in').

Shard entry per target: ``g`` (n, d_out, d_in') fp16 and ``scale`` (n,) float32.
"""

from __future__ import annotations

import torch

from .base import DenseBlock, Direction, StoreKind, register_store, scaled_fp16


@register_store
class DenseStore(StoreKind):
    name = "dense"
    exact = True

    def matrix(self, name: str, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """What is stored for one piece before scaling: here the gradient itself, (d_out, d_in') float32."""
        return d.t() @ x

    def __init__(self, settings, targets):
        super().__init__(settings, targets)
        #: (target, dtype) -> (direction, its flattened reference): one per pass, not one per block
        self._references: dict[tuple[str, torch.dtype], tuple[Direction, torch.Tensor]] = {}

    def reference(self, name: str, direction: Direction, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A direction (weight change or gradient) in the stored space (itself here): (d_out, d_in') of ``dtype``."""
        return direction.dense(dtype)

    def _reference_of(self, name: str, direction: Direction, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`reference` flattened, computed once per target and direction (a pass calls
        :meth:`contract` per block and target)."""
        got = self._references.get((name, dtype))
        if got is None or got[0] is not direction:
            self._references[(name, dtype)] = got = (direction, self.reference(name, direction, dtype).flatten())
        return got[1]

    def encode(self, name, x, d):
        g, s = scaled_fp16(self.matrix(name, x, d))
        return {"g": g, "scale": s}

    def pack(self, name, encoded):
        return {"g": torch.stack([e["g"] for e in encoded]),
                "scale": torch.tensor([e["scale"] for e in encoded], dtype=torch.float32)}

    def _rows(self, reader, start, stop, name):
        gs, ss = [], []
        for sh, k, k2 in self.row_slices(reader, start, stop, name):
            gs.append(sh["g"][k:k2]), ss.append(sh["scale"][k:k2])
        return torch.cat(gs), torch.cat(ss)

    def load_block(self, reader, start, stop, name, method):
        g, s = self._rows(reader, start, stop, name)
        return DenseBlock(g.float().flatten(1) * s[:, None])

    def stored_numbers(self, name: str) -> int:
        t = self.targets[name]
        return t.d_in_aug * t.d_out

    def block_bytes(self, name, block_size, tokens_per_piece, method):
        return block_size * self.stored_numbers(name) * 4, 0.0

    def sq_norms(self, reader, start, stop, name):
        g, s = self._rows(reader, start, stop, name)
        return (g.double().flatten(1) ** 2).sum(1) * s.double() ** 2

    def contract(self, reader, start, stop, name, direction, keep=None, dtype=torch.float32, chunk: int = 256):
        """<G_i, D> as one matrix-vector product per chunk of stored rows, in ``dtype`` (the fp16 rows are
        converted a chunk at a time, and never copied whole)."""
        ref = self._reference_of(name, direction, dtype)
        out = []
        for sh, k, k2 in self.row_slices(reader, start, stop, name):
            g, s = sh["g"], sh["scale"]
            for a in range(k, k2, chunk):
                b = min(k2, a + chunk)
                out.append((g[a:b].to(ref.device, dtype).flatten(1) @ ref).double().cpu() * s[a:b].double())
        return torch.cat(out)
