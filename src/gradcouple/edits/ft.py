"""Fine-tuning edits: Adam on the target layers toward the new targets, a simplified variant of the
constrained fine-tuning baseline when each weight's change is bounded (Meng et al. 2022, "Locating
and Editing Factual Associations in GPT"; Zhu et al. 2020, "Modifying Memories in Transformer
Models"); that baseline as its reference code does it is ``ft-l`` (ft_l.py)."""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field

from ..layers import Target
from ..scoring import EncodedPiece, collate, score
from .base import EditContext, EditMethod, Hparams, Rewrite, register_method


class FTHparams(Hparams):
    """Knobs of a fine-tuning edit."""

    steps: int = Field(default=25, ge=1, description="Adam steps per ft edit (at most, with early stop; 25 as FT in the "
                       "ROME paper)", json_schema_extra={"flag": "--steps"})
    lr: float = Field(default=5e-4, gt=0, description="Adam learning rate of an ft edit (5e-4 as FT in the ROME paper)",
                      json_schema_extra={"flag": "--lr"})
    max_delta: Optional[float] = Field(default=None, gt=0, description="Bound on every weight's change |dw| "
                                       "(L-infinity); None = unbounded", json_schema_extra={"flag": "--max-delta"})
    early_stop: bool = Field(default=True, description="Stop an ft edit once the new target is the greedy continuation")


def ft_edit(model, targets: list[Target], new: list[EncodedPiece], steps: int, lr: float, pad_id: int = 0,
            max_delta: float | None = None, early_stop: bool = False) -> dict[str, torch.Tensor]:
    """Adam on the target weights toward the answers of ``new`` (all edited together), each weight's
    change clamped to [-max_delta, max_delta] when given, stopping early once every new answer is
    the greedy continuation of its prompt.

    Returns Δθ per target, (d_out, d_in + bias) float32 on the CPU; the model is left edited.
    Adam updates float32 master copies, so bfloat16/float16 weights neither underflow Adam's
    moments nor round small steps away.
    """
    before = {t.name: t.weight_matrix().cpu() for t in targets}
    params = [t.module.weight for t in targets] + [t.module.bias for t in targets if t.has_bias]
    originals = [p.detach().float().clone() for p in params]
    masters = [o.clone().requires_grad_(True) for o in originals]
    for p in params:
        p.requires_grad_(True)
    try:
        opt = torch.optim.Adam(masters, lr=lr, fused=masters[0].device.type in ("cpu", "cuda"))  # one kernel, 6x on CPU
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


@register_method
class FineTuning(EditMethod):
    """Adam on every target layer toward all rewrites at once (bounded with ``max_delta``, a simplified FT-L)."""

    name = "ft"
    aliases = ("finetune",)
    summary = ("fine-tuning: Adam on all target layers, early stop; bounded with --max-delta, a simplified FT-L "
               "(Meng et al. 2022, the ROME paper's baseline)")
    Hparams = FTHparams
    strength = "lr"

    def apply(self, ctx: EditContext, rewrites: list[Rewrite]) -> dict[str, torch.Tensor]:
        hp = self.hp
        return ft_edit(ctx.model, ctx.targets, [r.new for r in rewrites], hp.steps, hp.lr, ctx.pad_id, hp.max_delta,
                       hp.early_stop)


__all__ = ["FTHparams", "FineTuning", "ft_edit"]
