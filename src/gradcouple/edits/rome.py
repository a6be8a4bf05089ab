"""A simplified ROME: the rank-one update of one MLP output projection toward a new target (Meng et
al. 2022, "Locating and Editing Factual Associations in GPT"; reference code kmeng01/rome,
rome/compute_u.py, compute_v.py, rome_main.py), without the reference's context prefixes, key
averaging, KL term and weight decay: the key is read from the edit prompt alone and the value
optimised for log P(new target) alone."""

from __future__ import annotations

import torch
from pydantic import Field

from ..layers import Target
from ..scoring import EncodedPiece, answer_logprob, collate
from .base import EditContext, EditMethod, Hparams, Rewrite, check_target_index, register_method


class RomeHparams(Hparams):
    """Knobs of a (simplified) ROME edit; the names follow the reference code's hparams."""

    layer: int = Field(default=0, description="Index into the extraction's target layers of the layer a rome edit "
                       "changes (0 = the lowest)")
    v_num_grad_steps: int = Field(default=20, ge=1, description="Adam steps optimising the value vector")
    v_lr: float = Field(default=0.5, gt=0, description="Adam learning rate of the value vector")
    clamp_norm_factor: float = Field(default=4.0, gt=0, description="Max |delta| of the value as a multiple of |W k*|",
                                     json_schema_extra={"flag": "--rome-clamp"})


def rome_edit(model, targets: list[Target], target: Target, new: EncodedPiece, cov: torch.Tensor,
              steps: int = 20, lr: float = 0.5, clamp: float = 4.0, pad_id: int = 0,
              key_position: int | None = None) -> dict[str, torch.Tensor]:
    """Rank-one edit of the linear layer ``target`` toward ``new``'s answer.

    The key k* is the layer's input at ``key_position``: the last token of the subject, as in
    ROME, where the caller located it (:func:`gradcouple.scoring.subject_position`), else the
    last prompt position. The value is found by optimising an additive delta on the layer's
    output there to maximise log P(a* | q) (Adam, ``steps`` at ``lr``, |delta| clamped to
    ``clamp`` * |W k*|). Then W <- W + delta u^T with u = C^-1 k* / (k*^T C^-1 k*) for the key
    covariance ``cov`` ((d_in', d_in') float64), so W k* moves by exactly delta while keys
    uncorrelated with k* under C barely move.

    Returns Δθ per target ((d_out, d_in') float32, zero but for ``target``); the model is left edited.
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


@register_method
class Rome(EditMethod):
    """One rank-one update per rewrite, applied one after another, of the layer ``hp.layer``."""

    name = "rome"
    summary = "rank-one update of one target layer (simplified ROME, Meng et al. 2022)"
    Hparams = RomeHparams
    strength = "clamp_norm_factor"
    needs = frozenset({"covariance"})

    def key_target(self, targets: list[Target]) -> Target:
        return check_target_index(self.name, self.hp.layer, targets)

    def touched(self, targets: list[Target]) -> list[Target]:
        return [self.key_target(targets)]

    def check(self, targets: list[Target]) -> None:
        self.key_target(targets)

    def apply(self, ctx: EditContext, rewrites: list[Rewrite]) -> dict[str, torch.Tensor]:
        layer, hp = self.key_target(ctx.targets), self.hp
        cov = ctx.covariance(layer)
        total: dict[str, torch.Tensor] = {}
        for rw in rewrites:
            d = rome_edit(ctx.model, ctx.targets, layer, rw.new, cov, hp.v_num_grad_steps, hp.v_lr, hp.clamp_norm_factor,
                          ctx.pad_id, key_position=rw.key_position)
            total = {k: total.get(k, 0) + v for k, v in d.items()}
        return total


__all__ = ["Rome", "RomeHparams", "rome_edit"]
