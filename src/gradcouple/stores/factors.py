"""``factors`` (exact, the default): per piece and target the inputs X (T, d_in') and output
gradients Delta (T, d_out), concatenated along tokens with offsets: T (d_in' + d_out) numbers
instead of d_out d_in'.

Shard entry per target: ``x`` (sum T, d_in') fp16, ``d`` (sum T, d_out) fp16, ``offsets`` (n+1,)
int64, ``x_scale`` / ``d_scale`` (n,) float32.
"""

from __future__ import annotations

import torch

from .base import Block, DenseBlock, FactoredBlock, StoreKind, register_store, scaled_fp16, token_contractions


@register_store
class FactorsStore(StoreKind):
    name = "factors"
    exact = True
    keeps_inputs = True

    def encode(self, name, x, d):
        xq, xs = scaled_fp16(x)
        dq, ds = scaled_fp16(d)
        return {"x": xq, "d": dq, "x_scale": xs, "d_scale": ds}

    def pack(self, name, encoded):
        lens = torch.tensor([e["x"].shape[0] for e in encoded], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        return {"x": torch.cat([e["x"] for e in encoded]), "d": torch.cat([e["d"] for e in encoded]), "offsets": offsets,
                "x_scale": torch.tensor([e["x_scale"] for e in encoded], dtype=torch.float32),
                "d_scale": torch.tensor([e["d_scale"] for e in encoded], dtype=torch.float32)}

    def _rows(self, reader, start, stop, name):
        """(x fp16, d fp16, seg (sum T,) int64 row within the block, x_scale, d_scale) of rows [start, stop)."""
        xs, ds, segs, sx, sd = [], [], [], [], []
        r = 0
        for sh, k, k2 in self.row_slices(reader, start, stop, name):
            o = sh["offsets"]
            xs.append(sh["x"][o[k]:o[k2]]), ds.append(sh["d"][o[k]:o[k2]])
            segs.append(torch.repeat_interleave(torch.arange(r, r + k2 - k), o[k + 1:k2 + 1] - o[k:k2]))
            sx.append(sh["x_scale"][k:k2]), sd.append(sh["d_scale"][k:k2])
            r += k2 - k
        return torch.cat(xs), torch.cat(ds), torch.cat(segs), torch.cat(sx), torch.cat(sd)

    def plan(self, name, tokens_per_piece, block_size, requested):
        """Per pair, factored costs T^2 (d_in' + d_out + 1) multiply-adds; dense costs d_in' d_out plus
        the materialisation of both blocks (2 T d_in' d_out / block_size, amortised)."""
        if requested != "auto":
            return requested
        t, T = self.targets[name], tokens_per_piece
        factored = T * T * (t.d_in_aug + t.d_out + 1)
        dense = t.d_in_aug * t.d_out * (1 + 2 * T / max(1, block_size))
        return "factored" if factored <= dense else "dense"

    def load_block(self, reader, start, stop, name, method) -> Block:
        x, d, seg, sx, sd = self._rows(reader, start, stop, name)
        n, scale = stop - start, sx * sd
        xf, df = x.float(), d.float()
        if method == "dense":
            bounds = torch.searchsorted(seg, torch.arange(n + 1))
            g = torch.empty(n, d.shape[1] * x.shape[1])
            for i in range(n):
                a, b = bounds[i], bounds[i + 1]
                g[i] = (df[a:b].t() @ xf[a:b]).flatten() * scale[i]
            return DenseBlock(g)
        s = torch.zeros(n, seg.numel())
        s[seg, torch.arange(seg.numel())] = scale[seg]
        return FactoredBlock(xf, df, s)

    def block_bytes(self, name, block_size, tokens_per_piece, method):
        t = self.targets[name]
        if method == "dense":
            return block_size * t.d_in_aug * t.d_out * 4, 0.0
        tokens = block_size * tokens_per_piece
        return tokens * (t.d_in_aug + t.d_out + block_size) * 4, 3 * tokens**2 * 4

    def sq_norms(self, reader, start, stop, name):
        x, d, seg, sx, sd = self._rows(reader, start, stop, name)
        x, d = x.double(), d.double()
        bounds = torch.searchsorted(seg, torch.arange(stop - start + 1))
        out = torch.zeros(stop - start, dtype=torch.float64)
        for k in range(stop - start):
            a, b = bounds[k], bounds[k + 1]
            out[k] = ((x[a:b] @ x[a:b].t()) * (d[a:b] @ d[a:b].t())).sum() * (float(sx[k]) * float(sd[k])) ** 2
        return out

    def contract(self, reader, start, stop, name, direction, keep=None, dtype=torch.float32):
        """sum over a piece's tokens of delta_t^T D x_t (only the tokens of ``keep``'s rows): a few dot
        products per token for a factored direction (:func:`~gradcouple.stores.base.token_contractions`),
        read shard slice by shard slice without copying the stored factors."""
        out = torch.zeros(stop - start, dtype=torch.float64)
        r = 0
        for sh, k, k2 in self.row_slices(reader, start, stop, name):
            o, n = sh["offsets"], k2 - k
            seg = torch.repeat_interleave(torch.arange(n), o[k + 1:k2 + 1] - o[k:k2])
            x, d = sh["x"][o[k]:o[k2]], sh["d"][o[k]:o[k2]]
            if keep is not None:
                tok = keep[r:r + n][seg]
                x, d, seg = x[tok], d[tok], seg[tok]
            per_tok = token_contractions(x, d, direction, dtype)
            scale = sh["x_scale"][k:k2].double() * sh["d_scale"][k:k2].double()
            out[r:r + n] = torch.zeros(n, dtype=torch.float64).index_add(0, seg, per_tok) * scale
            r += n
        return out

    def inputs(self, reader, start, stop, name):
        x, _, seg, sx, _ = self._rows(reader, start, stop, name)
        return x.double() * sx.double()[seg, None]
