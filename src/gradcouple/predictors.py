"""Predictors of the ripple effect, all computed on the unedited model (the first-order one from
the edit's actual weight change): one small registered function each, so adding a predictor
touches only this file.

A predictor maps an edit e and test queries q to a score per query. The edit's gradient is that
of its NEW target, g_e = ∇ log P(new target | edit prompt), the direction the edit moves (Qin et
al. 2024, arXiv:2407.12828); an edit made of several rewrites (an MQuAKE case) has g_e = Σ_j g_ej.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

#: name -> (function, definition)
PREDICTORS: dict[str, tuple[Callable, str]] = {}


def register_predictor(name: str, definition: str):
    """Decorator: make ``fn(ctx, edit_rows, original_rows, q) -> (len(q),) float64`` available as ``name``."""

    def add(fn):
        PREDICTORS[name] = (fn, definition)
        return fn

    return add


@dataclass
class PredictorContext:
    """What predictors read, all from the unedited model, in pieces.jsonl order.

    gram: (N, N) float64 <g_i, g_j>; keys: (N, d) float64 inputs of the edited layer at each
    piece's key position (the last token of its edit's subject where named, else the last prompt
    token); cinv_keys:
    C^-1 keys (N, d) float64, C the layer's key covariance; first_order: <g_j, Δθ> (N,) float64 of
    the current edit, set after it is made; logprobs: log P(answer | prompt) (N,) float64 in nats on
    the unedited model (NaN for pieces not measured); seed of the shuffled baseline.
    """

    gram: torch.Tensor
    keys: torch.Tensor
    cinv_keys: torch.Tensor
    first_order: Optional[torch.Tensor] = None
    logprobs: Optional[torch.Tensor] = None
    seed: int = 0
    norms: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.norms = self.gram.diagonal().clamp_min(0).sqrt()


def _combined_cosine(ctx: PredictorContext, rows: list[int], q: torch.Tensor) -> torch.Tensor:
    r = torch.tensor(rows)
    inner = ctx.gram[r][:, q].sum(0)
    norm_e = ctx.gram[r][:, r].sum().clamp_min(0).sqrt()
    return inner / (norm_e * ctx.norms[q]).clamp_min(1e-300)


@register_predictor("gradsim", "GradSim(e, q) = cos(g_e, g_q), g_e the gradient of the edit's NEW target.")
def gradsim(ctx, edit_rows, original_rows, q):
    return _combined_cosine(ctx, edit_rows, q)


@register_predictor("gradsim_old_answer", "cos(g_o, g_q) with g_o the gradient of the edited fact's OLD (true) answer: "
                    "the variant before the new-target definition, kept as a named comparison.")
def gradsim_old_answer(ctx, edit_rows, original_rows, q):
    if not original_rows:
        return torch.full((len(q),), float("nan"), dtype=torch.float64)
    return _combined_cosine(ctx, original_rows, q)


@register_predictor("inner_product", "<g_e, g_q>: the gradient inner product, GradSim times both norms.")
def inner_product(ctx, edit_rows, original_rows, q):
    return ctx.gram[torch.tensor(edit_rows)][:, q].sum(0)


@register_predictor("norm", "|g_q| alone: how much of any correlation gradient norms explain.")
def norm(ctx, edit_rows, original_rows, q):
    return ctx.norms[q].clone()


@register_predictor("first_order", "<g_q, Δθ>: the first-order change of log P for the edit's actual weight change Δθ (nats).")
def first_order(ctx, edit_rows, original_rows, q):
    return ctx.first_order[q].clone()


@register_predictor("activation_cosine", "cos(k_e, k_q) of the edited layer's inputs (forward only; CLaRE-like), each at "
                    "the last token of the edit's subject where the prompt names it, else at the last prompt token.")
def activation_cosine(ctx, edit_rows, original_rows, q):
    ke = ctx.keys[edit_rows].sum(0)
    kq = ctx.keys[q]
    return (kq @ ke) / (kq.norm(dim=1) * ke.norm()).clamp_min(1e-300)


@register_predictor("whitened_key", "k_e^T C^-1 k_q / (k_e^T C^-1 k_e) at the edited layer: the fraction of a ROME "
                    "update's change that reaches the test's key (Hu et al. 2024, 'Knowledge in Superposition').")
def whitened_key(ctx, edit_rows, original_rows, q):
    out = torch.zeros(len(q), dtype=torch.float64)
    for e in edit_rows:
        out += (ctx.keys[q] @ ctx.cinv_keys[e]) / (ctx.keys[e] @ ctx.cinv_keys[e]).clamp_min(1e-300)
    return out


@register_predictor("key_inner_product", "<k_e, k_q>: the inner product of the edited layer's inputs, keys taken as for "
                    "activation_cosine (forward only; Jin & Ren, ICML 2024, forecast forgetting from it).")
def key_inner_product(ctx, edit_rows, original_rows, q):
    return ctx.keys[q] @ ctx.keys[edit_rows].sum(0)


@register_predictor("prior_logprob", "log P(the test's post-edit answer | its prompt) on the unedited model (nats), the "
                    "same for every edit (forward only; Sun et al. 2025; Ge et al. 2024): how likely the new answer "
                    "already was.")
def prior_logprob(ctx, edit_rows, original_rows, q):
    if ctx.logprobs is None:
        return torch.full((len(q),), float("nan"), dtype=torch.float64)
    return ctx.logprobs[q].clone()


@register_predictor("shuffled", "GradSim values permuted at random among the queries scored (seeded): within an "
                    "edit's own tests for the correlations, a chance baseline; pooled figures keep the between-edit "
                    "structure, so read its pooled rho as the floor that structure alone gives.")
def shuffled(ctx, edit_rows, original_rows, q):
    rng = np.random.default_rng(ctx.seed + edit_rows[0])
    g = gradsim(ctx, edit_rows, original_rows, q)
    return g[torch.from_numpy(rng.permutation(len(q)))]


def predict(ctx: PredictorContext, edit_rows: list[int], original_rows: list[int], q: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every registered predictor's scores of the queries ``q`` for one edit: name -> (len(q),) float64."""
    return {name: fn(ctx, edit_rows, original_rows, q).double() for name, (fn, _) in PREDICTORS.items()}
