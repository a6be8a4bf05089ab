"""Independent reference: plain autograd, one piece per backward, dense gradients in float64."""

from __future__ import annotations

import torch

from gradcouple.layers import Target
from gradcouple.scoring import EncodedPiece


def oracle_gradients(model, targets: list[Target], piece: EncodedPiece) -> dict[str, torch.Tensor]:
    """{name: (d_out, d_in + bias) float64} from weight.grad of one unpadded piece, full logits."""
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


def oracle_gram(model, targets, pieces) -> tuple[torch.Tensor, list[float]]:
    """(N, N) float64 Gram of the flattened per-example gradients over all targets, and log-probs."""
    flat, lps = [], []
    for p in pieces:
        g, lp = oracle_gradients(model, targets, p)
        flat.append(torch.cat([g[t.name].flatten() for t in targets]))
        lps.append(lp)
    G = torch.stack(flat)
    return G @ G.t(), lps


def cosine_from_gram(G: torch.Tensor) -> torch.Tensor:
    n = G.diagonal().sqrt()
    return G / (n[:, None] * n[None, :])
