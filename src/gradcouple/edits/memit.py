"""MEMIT: many rewrites at once, spread over several MLP output projections (Meng et al. 2023,
"Mass-Editing Memory in a Transformer", Alg. 1; reference code kmeng01/memit, memit/memit_main.py,
memit/compute_z.py, memit/compute_ks.py; hyperparameter names as its hparams/MEMIT/*.json and
EasyEdit's hparams/MEMIT/*.yaml).

1. For each rewrite, the target z_i of the last edited block's output at the subject's last token
   (:func:`.value.optimise_value` at that block's output; context templates [["{}"], five of 10
   tokens]).
2. For each edited block l (in order, on the model as the blocks before it left it): the keys K
   (the rewrite module's input at the subject's last token, averaged within each template group
   and then across groups), the residual R = (Z − h_L(current)) / (number of blocks left), and in
   float64 ΔW_l = R Kᵀ (λ C + K Kᵀ)⁻¹ with λ = ``mom2_update_weight`` and C the key second moment.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from ..layers import Target, block_spec
from .base import EditContext, EditMethod, Rewrite, register_method
from .rome import apply_delta, check_loss_layer
from .templates import context_templates
from .value import ValueHparams, block_module, capture, prompt_rows, templated_prompts, optimise_value

log = logging.getLogger(__name__)


class MemitHparams(ValueHparams):
    """MEMIT's knobs, named as in kmeng01/memit's MEMITHyperParams; defaults are EasyEdit's
    hparams/MEMIT/llama-7b.yaml (a model's published file overrides them)."""

    mom2_update_weight: float = Field(default=15000.0, gt=0, description="lambda of lambda*C + K K^T: how strongly "
                                      "the keys of preserved text resist the update",
                                      json_schema_extra={"flag": "--mom2-update-weight"})
    context_template_length_params: list[list[int]] = Field(
        default_factory=lambda: [[10, 5]], description="[length in tokens, how many] of the generated context templates")


def memit_update(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT's closed form ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ in float64.

    Args:
        K: (d_in, n) keys. R: (d_out, n) residuals. C: (d_in, d_in) key second moment. lam: λ.
    Returns:
        (d_out, d_in) float64.
    """
    K, R, C = K.double(), R.double(), C.double()
    return R @ torch.linalg.solve(lam * C + K @ K.t(), K).t()


def normalised_mlp_output(model, blocks: list[int]) -> list[int]:
    """The blocks among ``blocks`` that normalise their MLP's output before adding it to the residual
    stream (Gemma 2 and 3, OLMo 2: ``post_feedforward_layernorm``). MEMIT's spread of the residual
    over blocks assumes the MLP output is added as it is, so there its update misses its target."""
    return [b for b in blocks if hasattr(block_module(model, b), "post_feedforward_layernorm")]


def group_mean_keys(ctx: EditContext, target: Target, rewrites: list[Rewrite], groups: list[list[str]],
                    fact_token: str) -> torch.Tensor:
    """MEMIT's compute_ks: per rewrite, ``target``'s input at the lookup token behind each template,
    averaged within each group and then across groups: (d_in, n) float64."""
    flat = [p for g in groups for p in g]
    cols = []
    for rw in rewrites:
        rows, pos = prompt_rows(templated_prompts(ctx.tokenizer, rw, flat, fact_token, ctx.max_length))
        x = capture(ctx.model, {"m": target.module}, rows, pos, ctx.pad_id)["m"][0]
        bounds = torch.cumsum(torch.tensor([0] + [len(g) for g in groups]), 0).tolist()
        cols.append(torch.stack([x[a:b].mean(0) for a, b in zip(bounds, bounds[1:])]).mean(0))
    return torch.stack(cols, 1)


@register_method
class Memit(EditMethod):
    """MEMIT as the reference code does it: every rewrite given to one ``apply`` is written at once."""

    name = "memit"
    summary = "rewrites spread over several MLP output projections at once (MEMIT, Meng et al. 2023; kmeng01/memit)"
    Hparams = MemitHparams
    strength = "clamp_norm_factor"
    needs = frozenset({"covariance"})
    unread = frozenset({"mom2_adjustment"})
    low_rank = True

    @classmethod
    def default_layers(cls, n_blocks: int) -> list[int]:
        lo, hi = round(n_blocks * 4 / 32), round(n_blocks * 8 / 32)  # EasyEdit's LLaMA-7B blocks 4-8 of 32
        return list(range(lo, max(lo, hi) + 1))

    def prepare(self, ctx: EditContext) -> None:
        check_loss_layer(self.name, self.hp.v_loss_layer, ctx.model)
        self.check(ctx.targets)
        normed = normalised_mlp_output(ctx.model, [t.block for t in self.touched(ctx.targets)])
        if normed:
            log.warning(f"--method {self.name}: block(s) {block_spec(normed)} of this {ctx.model.config.model_type} model "
                        "normalise the MLP output before adding it to the residual stream (post_feedforward_layernorm); "
                        "the spread of the residual over blocks assumes they do not, so edits may miss (docs/science.md, "
                        "Gemma 3); ROME optimises through the norm and is unaffected")
        if ctx.prefetch is not None:
            ctx.prefetch(self.touched(ctx.targets))
        for t in self.touched(ctx.targets):
            self.preserved(ctx, t)
        self.groups(ctx)

    def groups(self, ctx: EditContext) -> list[list[str]]:
        return context_templates(ctx.model, ctx.tokenizer, ctx.fingerprint, self.hp.context_template_length_params,
                                 ctx.seed)

    def preserved(self, ctx: EditContext, target: Target) -> torch.Tensor:
        """What the update must leave alone at ``target``: MEMIT's key second moment C, (d_in, d_in) float64."""
        return ctx.covariance(target)[:target.d_in, :target.d_in]

    def layer_update(self, ctx: EditContext, target: Target, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """ΔW of one edited block: (d_out, d_in) float64."""
        return memit_update(K, R, self.preserved(ctx, target), self.hp.mom2_update_weight)

    def after(self, ctx: EditContext, rewrites: list[Rewrite], groups: list[list[str]]) -> None:
        """What an edit leaves for the next (nothing for MEMIT)."""

    def apply(self, ctx: EditContext, rewrites: list[Rewrite]) -> dict[str, torch.Tensor]:
        hp, self.trace = self.hp, {}
        touched = sorted(self.touched(ctx.targets), key=lambda t: t.block)
        before = {t.name: t.weight_matrix().cpu() for t in touched}
        groups = self.groups(ctx)
        flat = [p for g in groups for p in g]
        z_block = block_module(ctx.model, touched[-1].block)
        width = ctx.model.config.get_text_config().hidden_size
        prompts = [templated_prompts(ctx.tokenizer, rw, flat, hp.fact_token, ctx.max_length) for rw in rewrites]
        zs = []
        for p in prompts:
            z_init, delta, _ = optimise_value(ctx, z_block, width, p, hp.v_num_grad_steps, hp.v_lr, hp.kl_factor,
                                              hp.v_weight_decay, hp.clamp_norm_factor)
            zs.append((z_init + delta).double().cpu())
        Z = torch.stack(zs, 1)  # (d, n)
        bare = [prompt_rows(p) for p in prompts]
        for i, t in enumerate(touched):
            K = group_mean_keys(ctx, t, rewrites, groups, hp.fact_token)
            cur = capture(ctx.model, {"z": z_block}, [r[0][0] for r in bare], [r[1][0] for r in bare], ctx.pad_id)["z"][1]
            R = (Z - cur.t()) / (len(touched) - i)  # the residual spread over the blocks left
            dw = self.layer_update(ctx, t, K, R)
            apply_delta(t, dw)
            self.trace[t.name] = {"K": K, "R": R, "Z": Z, "dW": dw, "subject_found": [p.found for p in prompts]}
        self.after(ctx, rewrites, groups)
        return {t.name: (t.weight_matrix().cpu() - before[t.name] if t.name in before else torch.zeros(t.d_out, t.d_in_aug))
                for t in ctx.targets}


__all__ = ["Memit", "MemitHparams", "group_mean_keys", "memit_update", "normalised_mlp_output"]
