"""AlphaEdit: MEMIT's update projected onto the null space of the preserved keys (Fang et al. 2025,
"AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models", eq. 14; reference code
jianghoucheng/AlphaEdit, AlphaEdit/AlphaEdit_main.py and experiments/evaluate.py ``get_project``;
hyperparameter names as its hparams/AlphaEdit/*.json).

The values z and keys K are MEMIT's (:mod:`.memit`). Per edited block, P = U₀U₀ᵀ, U₀ the
eigenvectors of the key second moment C whose eigenvalues are under ``nullspace_threshold`` (the
reference's SVD of C), so that P k₀ ≈ 0 for the keys of preserved text; then

    ΔWᵀ = (P (K Kᵀ + K_p K_pᵀ) + L2 · I)⁻¹ P K Rᵀ,

with K_p K_pᵀ the keys of the edits made before in a sequence (the reference's ``cache_c``,
emptied when the weights are restored). Because ΔW = (…) P, ΔW k₀ = 0 for every key k₀ with P k₀ = 0.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from ..io import atomic_torch_save, digest, tensor_sha256
from ..layers import Target
from ..models import cache_dir
from .base import EditContext, Rewrite, register_method
from .memit import Memit, group_mean_keys
from .value import ValueHparams

log = logging.getLogger(__name__)


class AlphaEditHparams(ValueHparams):
    """AlphaEdit's knobs, named and valued as jianghoucheng/AlphaEdit's hparams/AlphaEdit/Llama3-8B.json
    (a model's published file overrides them)."""

    v_lr: float = Field(default=0.1, gt=0, description="Adam learning rate of the value optimisation",
                        json_schema_extra={"flag": "--v-lr"})
    v_weight_decay: float = Field(default=0.5, ge=0, description="Weight of |delta| / |initial value|^2 in the value's loss")
    clamp_norm_factor: float = Field(default=0.75, gt=0, description="Largest |delta| of the value, as a multiple of its initial norm",
                                     json_schema_extra={"flag": "--clamp-norm-factor"})
    nullspace_threshold: float = Field(default=2e-2, gt=0, description="Eigenvalues of C under this span the null "
                                       "space the update is projected onto", json_schema_extra={"flag": "--nullspace-threshold"})
    L2: float = Field(default=10.0, ge=0, description="Ridge of the projected normal equations")
    context_template_length_params: list[list[int]] = Field(
        default_factory=lambda: [[10, 5]], description="[length in tokens, how many] of the generated context templates")


def null_space_projector(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀U₀ᵀ over the eigenvectors of the symmetric ``C`` ((d, d)) with eigenvalue < ``threshold``:
    (d, d) float64."""
    S, U = torch.linalg.eigh(C.double())
    U0 = U[:, S < threshold]
    return U0 @ U0.t()


def alphaedit_update(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, cache_c: torch.Tensor, L2: float) -> torch.Tensor:
    """AlphaEdit's closed form ΔW = [(P (K Kᵀ + cache_c) + L2 I)⁻¹ P K Rᵀ]ᵀ in float64.

    Args:
        K: (d_in, n) keys. R: (d_out, n) residuals. P: (d_in, d_in) null-space projector.
        cache_c: (d_in, d_in) K_p K_pᵀ of earlier edits in a sequence (zeros otherwise).
    Returns:
        (d_out, d_in) float64.
    """
    K, R, P, cache_c = K.double(), R.double(), P.double(), cache_c.double()
    A = P @ (K @ K.t() + cache_c) + L2 * torch.eye(K.shape[0], dtype=torch.float64)
    return torch.linalg.solve(A, P @ K @ R.t()).t()


@register_method
class AlphaEdit(Memit):
    """AlphaEdit as the reference code does it (MEMIT's values and keys, the null-space projected update)."""

    name = "alphaedit"
    summary = ("MEMIT's update projected onto the null space of preserved keys (AlphaEdit, Fang et al. 2025; "
               "jianghoucheng/AlphaEdit)")
    Hparams = AlphaEditHparams
    strength = "clamp_norm_factor"
    unread = frozenset({"mom2_adjustment", "mom2_update_weight"})

    def __init__(self, hp, source: str = "the method's defaults"):
        super().__init__(hp, source)
        self.cache_c: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.cache_c = {}

    def preserved(self, ctx: EditContext, target: Target) -> torch.Tensor:
        """The null-space projector P of ``target``'s key second moment, (d_in, d_in) float64: kept in
        the run's memo and in the user cache, keyed by C's digest and the threshold."""
        C = ctx.covariance(target)[:target.d_in, :target.d_in]
        key = digest(["null space", tensor_sha256(C),
                      self.hp.nullspace_threshold])
        if key in ctx.memo:
            return ctx.memo[key]
        path = cache_dir() / "null-space" / f"{key}.pt"
        P = None
        if path.is_file():
            try:
                P = torch.load(path, weights_only=True).double()
            except Exception:  # noqa: BLE001 (a damaged cache file is recomputed)
                P = None
        if P is None or P.shape != C.shape:
            P = null_space_projector(C, self.hp.nullspace_threshold)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(P.float(), path)
            log.info(f"AlphaEdit null space of {target.name}: {int(round(float(P.trace())))} of {C.shape[0]} dimensions "
                     f"(eigenvalues of C under {self.hp.nullspace_threshold:g})")
        ctx.memo[key] = P
        return P

    def layer_update(self, ctx: EditContext, target: Target, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        cache = self.cache_c.get(target.name, torch.zeros(target.d_in, target.d_in, dtype=torch.float64))
        return alphaedit_update(K, R, self.preserved(ctx, target), cache, self.hp.L2)

    def after(self, ctx: EditContext, rewrites: list[Rewrite], groups: list[list[str]]) -> None:
        """Add the keys of these rewrites, read on the edited model, to every edited block's cache_c."""
        for t in self.touched(ctx.targets):
            K = group_mean_keys(ctx, t, rewrites, groups, self.hp.fact_token)
            self.cache_c[t.name] = self.cache_c.get(t.name, torch.zeros(t.d_in, t.d_in, dtype=torch.float64)) + K @ K.t()


__all__ = ["AlphaEdit", "AlphaEditHparams", "alphaedit_update", "null_space_projector"]
