"""FT-L: fine-tuning of chosen MLP output projections with every weight kept within
``norm_constraint`` of its value (Zhu et al. 2020, "Modifying Memories in Transformer Models";
the constrained fine-tuning baseline of Meng et al. 2022; reference code kmeng01/rome
baselines/ft/ft_main.py and zjunlp/EasyEdit easyeditor/models/ft/ft_main.py, whose hparams
names these are).

Adam on the weights (and biases) of the edited blocks for ``num_steps`` epochs over the rewrites
in chunks of ``batch_size``; a chunk whose loss is under 0.01 takes no step, an epoch whose mean
loss is under 0.01 ends the edit, and after each step every weight is clamped to
[w₀ − norm_constraint, w₀ + norm_constraint]. The loss is EasyEdit's ``objective_optimization``:
'prompt_last' (the ROME paper's and EasyEdit's FT-L: every target token scored from the last
prompt token) or 'target_new' (EasyEdit's FT-M: teacher-forced NLL of the target).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, field_validator

from ..scoring import collate, final_logits
from .base import EditContext, EditMethod, Hparams, Layers, Rewrite, register_method

#: the loss under which FT takes no step, and under which an epoch's mean ends the edit (both references)
FT_STOP_LOSS = 1e-2


class FTLHparams(Hparams):
    """FT-L's knobs, named as the reference FTHyperParams; defaults are its hparams/FT/gpt2-xl_constr.json
    (a model's published file overrides them)."""

    layers: Layers = Field(default=None, description="Blocks whose MLP output projections the method edits, e.g. 4-8; none: the "
                           "model's published setting (gradcouple/hparams)", json_schema_extra={"flag": "--edit-layers"})
    num_steps: int = Field(default=25, ge=1, description="Epochs of Adam over the rewrites (at most)",
                           json_schema_extra={"flag": "--num-steps"})
    lr: float = Field(default=5e-4, gt=0, description="Adam learning rate", json_schema_extra={"flag": "--lr"})
    weight_decay: float = Field(default=0.0, ge=0, description="Adam weight decay")
    norm_constraint: Optional[float] = Field(default=5e-4, gt=0, description="Largest change of any one weight "
                                             "(L-infinity); none: unconstrained fine-tuning",
                                             json_schema_extra={"flag": "--norm-constraint"})
    objective_optimization: Literal["prompt_last", "target_new"] = Field(
        default="prompt_last", description="prompt_last (FT-L: all target tokens from the last prompt token) or "
        "target_new (FT-M: teacher-forced target)")
    batch_size: int = Field(default=128, ge=1, description="Rewrites per Adam step")

    @field_validator("norm_constraint", mode="before")
    @classmethod
    def _false_is_none(cls, v):
        return None if v is False else v  # EasyEdit's files write "norm_constraint: false"


def ft_loss(model, rewrites: list[Rewrite], objective: str, pad_id: int) -> torch.Tensor:
    """Mean over rewrites of the reference's per-rewrite loss (nats per target token), a scalar."""
    device = next(model.parameters()).device
    batch = collate([r.new for r in rewrites], pad_id).to(device)
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    n = torch.zeros(len(rewrites), device=device).index_add(0, batch.pos_b, torch.ones_like(batch.pos_b, dtype=torch.float32))
    if objective == "prompt_last":
        last = torch.tensor([r.new.answer_start - 1 for r in rewrites], device=device)
        lp = final_logits(model, hidden[torch.arange(len(rewrites), device=device), last]).log_softmax(-1)
        tok = lp[batch.pos_b, batch.targets]
    else:
        tok = final_logits(model, hidden[batch.pos_b, batch.pos_t]).log_softmax(-1).gather(1, batch.targets[:, None])[:, 0]
    per = -torch.zeros(len(rewrites), device=device, dtype=tok.dtype).index_add(0, batch.pos_b, tok) / n
    return per.mean()


@register_method
class FTL(EditMethod):
    """FT-L (and FT-M with objective_optimization target_new) as the reference code does it."""

    name = "ft-l"
    aliases = ("ftl",)
    summary = ("FT-L: fine-tuning of chosen MLP projections, each weight within norm_constraint (Zhu et al. 2020; "
               "the ROME paper's baseline; EasyEdit ft_main)")
    Hparams = FTLHparams
    strength = "norm_constraint"
    unread = frozenset({"kl_factor"})

    @classmethod
    def default_layers(cls, n_blocks: int) -> list[int]:
        return [max(0, round(n_blocks * 5 / 32))]  # where ROME edits: the two are compared at one site

    def apply(self, ctx: EditContext, rewrites: list[Rewrite]) -> dict[str, torch.Tensor]:
        hp = self.hp
        touched = self.touched(ctx.targets)
        before = {t.name: t.weight_matrix().cpu() for t in touched}
        params = [p for t in touched for p in (t.module.weight, t.module.bias) if p is not None]
        originals = [p.detach().float().clone() for p in params]
        masters = [o.clone().requires_grad_(True) for o in originals]  # fp32 copies: 16-bit weights keep small steps
        opt = torch.optim.Adam(masters, lr=hp.lr, weight_decay=hp.weight_decay,
                               fused=masters[0].device.type in ("cpu", "cuda"))  # one kernel, 6x on CPU
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                for _ in range(hp.num_steps):
                    losses = []
                    for k in range(0, len(rewrites), hp.batch_size):
                        chunk = rewrites[k:k + hp.batch_size]
                        opt.zero_grad(set_to_none=True)
                        loss = ft_loss(ctx.model, chunk, hp.objective_optimization, ctx.pad_id)
                        losses.append((loss.item(), len(chunk)))
                        if losses[-1][0] >= FT_STOP_LOSS:
                            loss.backward()
                            for p, m in zip(params, masters):
                                m.grad, p.grad = p.grad.float(), None
                            opt.step()
                        with torch.no_grad():
                            for p, m, o in zip(params, masters, originals):
                                if hp.norm_constraint is not None:
                                    m.copy_(torch.clamp(m, min=o - hp.norm_constraint, max=o + hp.norm_constraint))
                                p.copy_(m)
                    if sum(v * n for v, n in losses) / len(rewrites) < FT_STOP_LOSS:
                        break
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        return {t.name: (t.weight_matrix().cpu() - before[t.name] if t.name in before else torch.zeros(t.d_out, t.d_in_aug))
                for t in ctx.targets}


__all__ = ["FTL", "FTLHparams", "ft_loss"]
