"""Per-example gradients of the answer log-probability, as exact factors.

For a target y = W x + b seen at positions t = 1..T of piece i, with inputs X_i (T, d_in)
and output gradients Delta_i (T, d_out), the per-example gradient is

    G_i = Delta_i^T [X_i, 1]        (d_out, d_in + has_bias)

(the bias gradient is Delta_i^T 1, so the bias is one more input column of ones). One
batched forward/backward of the summed log-probabilities yields every piece's factors,
since pieces in a batch do not interact and padded positions carry Delta = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import FactorCapture
from .layers import Target
from .scoring import Batch, answer_logprob


@dataclass
class PieceFactors:
    """One piece's exact factors, float32 on CPU.

    x[name]: (T, d_in + has_bias); d[name]: (T, d_out); logprob in nats;
    sq_norm[name]: |G|_F^2 accumulated in float64.
    """

    x: dict[str, torch.Tensor]
    d: dict[str, torch.Tensor]
    logprob: float
    sq_norm: dict[str, float]

    def dense(self, name: str) -> torch.Tensor:
        """G = Delta^T X: (d_out, d_in + has_bias) float32."""
        return self.d[name].t() @ self.x[name]


def factored_sq_norm(x: torch.Tensor, d: torch.Tensor) -> float:
    """|Delta^T X|_F^2 = sum((X X^T) * (Delta Delta^T)), in float64 (ghost norm, as in Opacus)."""
    x64, d64 = x.double(), d.double()
    return float(((x64 @ x64.t()) * (d64 @ d64.t())).sum())


def batch_factors(model, targets: list[Target], batch: Batch) -> list[PieceFactors]:
    """Per-piece factors for a batch with one forward and one backward pass.

    Args:
        batch: a :class:`~gradcouple.scoring.Batch` already on the model's device.

    Returns:
        one :class:`PieceFactors` per piece, in batch order; only the ``lengths[b]`` real
        positions of each piece are kept.
    """
    with FactorCapture(targets) as cap:
        with torch.enable_grad():
            lp = answer_logprob(model, batch)
            lp.sum().backward()
        missing = [t.name for t in targets if t.name not in cap.grads]
        if missing:
            raise RuntimeError(f"no gradient reached target modules {missing}: are they used in the forward pass?")
        inputs = {t.name: cap.inputs[t.name].float().cpu() for t in targets}
        grads = {t.name: cap.grads[t.name].float().cpu() for t in targets}
    out = []
    lengths = batch.lengths.tolist()
    lps = lp.detach().double().cpu().tolist()
    for b, n in enumerate(lengths):
        xs, ds, norms = {}, {}, {}
        for t in targets:
            x = inputs[t.name][b, :n]
            if t.has_bias:
                x = torch.cat([x, torch.ones(n, 1)], dim=1)
            d = grads[t.name][b, :n]
            xs[t.name], ds[t.name] = x.contiguous(), d.contiguous()
            norms[t.name] = factored_sq_norm(x, d)
        out.append(PieceFactors(xs, ds, lps[b], norms))
    return out
