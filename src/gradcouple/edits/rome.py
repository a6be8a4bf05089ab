"""ROME: a rank-one update of one MLP output projection (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT", §3.1; reference code kmeng01/rome at 0874014, rome/rome_main.py,
rome/compute_u.py, rome/compute_v.py; hyperparameter names as in its hparams/ROME/*.json and
EasyEdit's hparams/ROME/*.yaml).

For each edited block, in order:

1. the key u: the rewrite module's input at the subject's last token, averaged over the prompt
   behind every context template (:mod:`.templates`), times C⁻¹ when ``mom2_adjustment``, then
   normalised;
2. the value v* = v_init + δ (:func:`.value.optimise_value` at the MLP output);
3. with k*, W k* the module's input and output at the bare prompt's subject token,
   ΔW = (v* − W k*) uᵀ / (k*·u), so that afterwards W k* = v* exactly, while a key k with
   uᵀk = 0 (orthogonal to the averaged key under C⁻¹) maps as before.

Several rewrites are made one after another, each on the model the previous left.
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field

from ..errors import ConfigError
from ..layers import Target
from .base import EditContext, EditMethod, Rewrite, register_method
from .templates import context_templates
from .value import (ValueHparams, capture, last_block, module_io_at, optimise_value, prompt_rows,
                    templated_prompts)



class RomeHparams(ValueHparams):
    """ROME's knobs, named as in kmeng01/rome's ROMEHyperParams; defaults are EasyEdit's
    hparams/ROME/llama-7b.yaml (a model's published file overrides them)."""

    mom2_adjustment: bool = Field(default=False, description="Whiten the key by the inverse key second moment C^-1")
    context_template_length_params: list[list[int]] = Field(
        default_factory=lambda: [[5, 10], [10, 10]],
        description="[length in tokens, how many] of the generated context templates")


def check_loss_layer(method: str, v_loss_layer: Optional[int], model) -> None:
    """The value's loss is read at the model's output, which is the reference's v_loss_layer in every
    published setting (the last block).

    Raises:
        ConfigError: another block is asked for.
    """
    last = last_block(model)
    if v_loss_layer is not None and v_loss_layer != last:
        raise ConfigError(f"ripple.hparams.{method}.v_loss_layer={v_loss_layer}: gradcouple reads the value's loss at "
                          f"the model's output, block {last}; set it to {last} or leave it unset.")


def mean_key(ctx: EditContext, target: Target, rewrite: Rewrite, prefixes: list[str], fact_token: str) -> torch.Tensor:
    """``target``'s input at the lookup token of the rewrite behind each prefix, averaged: (d_in,) float64."""
    prompts = templated_prompts(ctx.tokenizer, rewrite, prefixes, fact_token, ctx.max_length)
    rows, pos = prompt_rows(prompts)
    return capture(ctx.model, {"m": target.module}, rows, pos, ctx.pad_id)["m"][0].mean(0)


def rome_update(target: Target, u: torch.Tensor, v_star: torch.Tensor, k_star: torch.Tensor,
                w_k_star: torch.Tensor) -> torch.Tensor:
    """ROME's closed form: ΔW = (v* − W k*) uᵀ / (k*·u), (d_out, d_in) float64, so (W + ΔW) k* = v*.

    Args:
        u: (d_in,) the normalised (whitened) key. v_star, w_k_star: (d_out,). k_star: (d_in,).
    """
    return torch.outer((v_star.double() - w_k_star.double()) / (k_star.double() @ u.double()), u.double())


def apply_delta(target: Target, dw: torch.Tensor) -> None:
    """W += ΔW for a (d_out, d_in) weight change (the bias, if any, left alone)."""
    full = torch.zeros(target.d_out, target.d_in_aug, dtype=torch.float64)
    full[:, :target.d_in] = dw
    target.add_(full.to(target.module.weight.device))


@register_method
class Rome(EditMethod):
    """ROME as the reference code does it, one rewrite after another, one rank-one update per edited block."""

    name = "rome"
    summary = "rank-one update of one MLP output projection (ROME, Meng et al. 2022; kmeng01/rome)"
    Hparams = RomeHparams
    strength = "clamp_norm_factor"
    batch = "one by one"  # it reads the covariance only with mom2_adjustment (its prepare)
    low_rank = True

    @classmethod
    def default_layers(cls, n_blocks: int) -> list[int]:
        return [max(0, round(n_blocks * 5 / 32))]  # EasyEdit's LLaMA-7B block 5 of 32, at the same depth

    def prepare(self, ctx: EditContext) -> None:
        check_loss_layer(self.name, self.hp.v_loss_layer, ctx.model)
        self.check(ctx.targets)
        if self.hp.mom2_adjustment:
            if ctx.prefetch is not None:
                ctx.prefetch(self.touched(ctx.targets))
            for t in self.touched(ctx.targets):
                ctx.covariance(t)
        self.prefixes(ctx)

    def prefixes(self, ctx: EditContext) -> list[str]:
        """ROME's flat list of context templates: the bare prompt, then every generated one."""
        groups = context_templates(ctx.model, ctx.tokenizer, ctx.fingerprint, self.hp.context_template_length_params,
                                   ctx.seed)
        return [p for g in groups for p in g]

    def apply(self, ctx: EditContext, rewrites: list[Rewrite]) -> dict[str, torch.Tensor]:
        hp, self.trace = self.hp, {}
        before = {t.name: t.weight_matrix().cpu() for t in self.touched(ctx.targets)}
        prefixes = self.prefixes(ctx)
        for rw in rewrites:
            for t in sorted(self.touched(ctx.targets), key=lambda t: t.block):
                u = mean_key(ctx, t, rw, prefixes, hp.fact_token)
                if hp.mom2_adjustment:
                    u = torch.linalg.solve(ctx.covariance(t)[:t.d_in, :t.d_in], u)
                u = u / u.norm()
                prompts = templated_prompts(ctx.tokenizer, rw, prefixes, hp.fact_token, ctx.max_length)
                v_init, delta, _ = optimise_value(ctx, t.module, t.d_out, prompts, hp.v_num_grad_steps, hp.v_lr,
                                                  hp.kl_factor, hp.v_weight_decay, hp.clamp_norm_factor)
                k_star, w_k_star = module_io_at(ctx, t, prompts)
                v_star = (v_init + delta).double().cpu()
                apply_delta(t, rome_update(t, u, v_star, k_star, w_k_star))
                self.trace[t.name] = {"u": u, "k_star": k_star, "v_star": v_star, "subject_found": prompts.found}
        return {t.name: (t.weight_matrix().cpu() - before[t.name] if t.name in before else torch.zeros(t.d_out, t.d_in_aug))
                for t in ctx.targets}


__all__ = ["Rome", "RomeHparams", "apply_delta", "check_loss_layer", "mean_key", "rome_update"]
