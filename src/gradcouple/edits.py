"""Edits of the target layers: gradient-step fine-tuning and a ROME-style rank-one update.

Both return Delta theta per target as (d_out, d_in + bias) float32 matrices (zero for targets
an edit does not touch) and leave the model edited; :func:`snapshot` / :func:`restore` put the
weights back bit for bit.
"""

from __future__ import annotations

import torch

from .layers import Target
from .scoring import EncodedPiece, answer_logprob, collate, score
from .stores import GradientReader


def ft_edit(model, targets: list[Target], new: list[EncodedPiece], steps: int, lr: float, pad_id: int = 0,
            max_delta: float | None = None, early_stop: bool = False) -> dict[str, torch.Tensor]:
    """Fine-tuning edit, FT-L when ``max_delta`` is set (Meng et al. 2022, "Locating and Editing
    Factual Associations in GPT", their constrained fine-tuning baseline): Adam on the target weights toward the answers of ``new``
    (all edited together), each weight's change clamped to [-max_delta, max_delta] when given,
    stopping early once every new answer is the greedy continuation of its prompt.

    Returns Delta theta per target, (d_out, d_in + bias) float32 on the CPU; the model is left
    edited (restore it with :func:`snapshot` / :func:`restore`). Adam updates float32 master
    copies, so bfloat16/float16 weights neither underflow Adam's moments nor round small steps away.
    """
    before = {t.name: t.weight_matrix().cpu() for t in targets}
    params = [t.module.weight for t in targets] + [t.module.bias for t in targets if t.has_bias]
    originals = [p.detach().float().clone() for p in params]
    masters = [o.clone().requires_grad_(True) for o in originals]
    for p in params:
        p.requires_grad_(True)
    try:
        opt = torch.optim.Adam(masters, lr=lr)
        batch = collate(new, pad_id).to(next(model.parameters()).device)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                lp, greedy = score(model, batch)
                if early_stop and bool(greedy.all()):
                    break
                (-lp.sum()).backward()
                for p, m in zip(params, masters):
                    m.grad, p.grad = p.grad.float(), None
                opt.step()
                with torch.no_grad():
                    for p, m, o in zip(params, masters, originals):
                        if max_delta is not None:
                            m.copy_(o + (m - o).clamp(-max_delta, max_delta))
                        p.copy_(m)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return {t.name: t.weight_matrix().cpu() - before[t.name] for t in targets}


def snapshot(targets: list[Target]) -> dict[str, list[torch.Tensor]]:
    """Exact copies of the target weights (and biases)."""
    return {t.name: [p.detach().clone() for p in (t.module.weight, t.module.bias) if p is not None] for t in targets}


def restore(targets: list[Target], saved: dict[str, list[torch.Tensor]]) -> bool:
    """Copy the saved tensors back; True when every weight is bit-for-bit equal to the copy."""
    ok = True
    with torch.no_grad():
        for t in targets:
            for p, s in zip([p for p in (t.module.weight, t.module.bias) if p is not None], saved[t.name]):
                p.copy_(s)
                ok &= torch.equal(p, s)
    return ok


def key_covariance(reader: GradientReader, name: str, ridge: float = 1e-2, block_size: int = 256) -> torch.Tensor:
    """C = E[k k^T] over every stored input position of target ``name``: (d_in', d_in') float64.

    ROME estimates this second moment of the layer's keys on Wikipedia text; here it comes from
    the pieces' own stored inputs X. A ridge of ``ridge`` times the mean eigenvalue keeps it
    invertible.

    Raises:
        ArtifactError: the store keeps no inputs (dense and projected stores).
    """
    d = next(t.d_in_aug for t in reader.manifest.targets if t.name == name)
    C = torch.zeros(d, d, dtype=torch.float64)
    count = 0
    for i0 in range(0, reader.n, block_size):
        xs = reader.kind.inputs(reader, i0, min(reader.n, i0 + block_size), name)
        C += xs.t() @ xs
        count += xs.shape[0]
    C /= max(1, count)
    return C + ridge * C.diagonal().mean() * torch.eye(d, dtype=torch.float64)


def rome_edit(model, targets: list[Target], target: Target, new: EncodedPiece, cov: torch.Tensor,
              steps: int = 20, lr: float = 0.5, clamp: float = 4.0, pad_id: int = 0,
              key_position: int | None = None) -> dict[str, torch.Tensor]:
    """ROME-style rank-one edit of one linear layer (Meng et al. 2022, "Locating and Editing
    Factual Associations in GPT"), toward ``new``'s answer.

    The key k* is the layer's input at ``key_position``: the last token of the subject, as in
    ROME, where the caller located it (:func:`gradcouple.scoring.subject_position`), else the
    last prompt position. The value is found by optimising an additive delta on the
    layer's output there to maximise log P(a* | q) (Adam, ``steps`` at ``lr``, |delta| clamped
    to ``clamp`` * |W k*|). Then W <- W + delta u^T with u = C^-1 k* / (k*^T C^-1 k*), so W k* moves
    by exactly delta while keys uncorrelated with k* under C barely move.
    """
    device = next(model.parameters()).device
    batch = collate([new], pad_id).to(device)
    pos = new.answer_start - 1 if key_position is None else key_position
    cache: dict[str, torch.Tensor] = {}
    delta = torch.zeros(target.d_out, device=device, requires_grad=True)

    def hook(module, args, output):
        cache["k"] = args[0][0, pos].detach()
        out = output.clone()
        out[0, pos] = out[0, pos] + delta.to(out.dtype)
        return out

    h = target.module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            answer_logprob(model, batch)
        k = cache["k"].double().cpu()
        if target.has_bias:
            k = torch.cat([k, torch.ones(1, dtype=torch.float64)])
        wk_norm = float((target.weight_matrix().double().cpu() @ k).norm())
        opt = torch.optim.Adam([delta], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                (-answer_logprob(model, batch).sum()).backward()
                opt.step()
                with torch.no_grad():
                    n = float(delta.norm())
                    if n > clamp * wk_norm > 0:
                        delta.mul_(clamp * wk_norm / n)
    finally:
        h.remove()
    ck = torch.linalg.solve(cov, k)
    upd = (delta.detach().double().cpu()[:, None] * (ck / (k @ ck))[None, :]).float()
    target.add_(upd.to(device))
    return {t.name: (upd if t.name == target.name else torch.zeros(t.d_out, t.d_in_aug)) for t in targets}
