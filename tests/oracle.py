"""Independent reference: plain autograd, one piece per backward, dense gradients in float64.

Nothing here uses gradcouple's capture, factors, stores or Gram code: every quantity is computed
from ``weight.grad`` of the model's own full forward (all logits) and the textbook definitions.
"""

from __future__ import annotations

import torch

from gradcouple.layers import Target
from gradcouple.scoring import EncodedPiece


def oracle_gradients(model, targets: list[Target], piece: EncodedPiece) -> tuple[dict[str, torch.Tensor], float]:
    """({name: (d_out, d_in + bias) float64} from weight.grad of one unpadded piece, full logits;
    the answer log-prob in nats)."""
    params = []
    for t in targets:
        t.module.weight.requires_grad_(True)
        params.append(t.module.weight)
        if t.has_bias:
            t.module.bias.requires_grad_(True)
            params.append(t.module.bias)
    try:
        ids = torch.tensor([piece.ids])
        logits = model(input_ids=ids).logits[0].double()
        lp = logits[:-1].log_softmax(-1)
        tgt = ids[0, 1:]
        total = lp[torch.arange(piece.answer_start - 1, len(piece.ids) - 1), tgt[piece.answer_start - 1:]].sum()
        grads = torch.autograd.grad(total, params)
    finally:
        for p in params:
            p.requires_grad_(False)
    out, k = {}, 0
    for t in targets:
        gw = grads[k].double(); k += 1
        gw = gw.t() if t.transposed else gw
        if t.has_bias:
            gw = torch.cat([gw, grads[k].double()[:, None]], dim=1); k += 1
        out[t.name] = gw
    return out, float(total.detach())


def oracle_piece_gradients(model, targets: list[Target], pieces) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """:func:`oracle_gradients` of every piece: (per-piece {name: gradient}, log-probs)."""
    grads, lps = [], []
    for p in pieces:
        g, lp = oracle_gradients(model, targets, p)
        grads.append(g)
        lps.append(lp)
    return grads, lps


def flatten(grads: list[dict[str, torch.Tensor]], names: list[str]) -> torch.Tensor:
    """(N, P) float64: each piece's gradients over ``names``, flattened and concatenated."""
    return torch.stack([torch.cat([g[n].flatten() for n in names]) for g in grads])


def oracle_gram(model, targets, pieces) -> tuple[torch.Tensor, list[float]]:
    """(N, N) float64 Gram of the flattened per-example gradients over all targets, and log-probs."""
    grads, lps = oracle_piece_gradients(model, targets, pieces)
    flat = flatten(grads, [t.name for t in targets])
    return flat @ flat.t(), lps


def oracle_first_order(grads: list[dict[str, torch.Tensor]], deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """<g_j, Delta W> summed over targets for every piece j: (N,) float64."""
    return torch.tensor([sum(float((g[n] * deltas[n].double()).sum()) for n in deltas) for g in grads],
                        dtype=torch.float64)


def cosine_from_gram(G: torch.Tensor) -> torch.Tensor:
    n = G.diagonal().sqrt()
    return G / (n[:, None] * n[None, :])
