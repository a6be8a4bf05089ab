"""What every edit method provides, the registry, and the one way an edit is applied and undone.

An edit method is one class (one module under :mod:`gradcouple.edits`) with its name, its
hyperparameters (a pydantic model whose fields are its knobs, with their flags and defaults),
what it needs from the run, and ``apply``, which edits the model in place and returns the weight
change Δθ per target. :func:`edited` is how a stage applies one: the touched weights are copied
first and restored bit for bit afterwards, whatever happens in between, as EasyEdit does
(easyeditor/models/rome/rome_main.py keeps a copy of the touched weights). Adding a method means
one new module that subclasses :class:`EditMethod` and calls :func:`register_method`, as the
store kinds and predictors are registered.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Optional

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from ..config import canonical_knob
from ..errors import ArtifactError, ConfigError
from ..layers import Target
from ..scoring import EncodedPiece

if TYPE_CHECKING:
    from ..stores import GradientReader


class Hparams(BaseModel):
    """Base of a method's hyperparameters: every field is a knob; ``json_schema_extra={"flag": ...}``
    gives the CLI flag (and API keyword) that sets it."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Rewrite:
    """One requested rewrite: the prompt with its NEW target as an encoded piece, and the token
    position of the key (the last token of the subject where the prompt names it; None: the last
    prompt token)."""

    new: EncodedPiece
    key_position: Optional[int] = None


@dataclass
class EditContext:
    """What a method may use: the model and its target layers (the extraction's), the stored
    gradients, and ``covariance(target)``, the key covariance C = E[k kᵀ] of a target's inputs
    ((d_in', d_in') float64, computed once per target and kept)."""

    model: torch.nn.Module
    targets: list[Target]
    pad_id: int
    reader: Optional["GradientReader"]
    covariance: Callable[[Target], torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


class EditMethod(ABC):
    """One edit method with resolved hyperparameters ``self.hp``."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()  #: other names --method accepts for it
    summary: ClassVar[str]                  #: one line: the method and its source (paper, reference code)
    Hparams: ClassVar[type[Hparams]]
    strength: ClassVar[str]                 #: the knob ``--sweep`` varies
    #: what it reads beyond the model: "covariance" (the key covariance of the layer it edits)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, hp: Hparams):
        self.hp = hp

    @classmethod
    def knobs(cls) -> dict[str, str]:
        """knob -> its flag (``--lr``); knobs without a flag are set in a config file only."""
        return {name: (f.json_schema_extra or {}).get("flag", "") for name, f in cls.Hparams.model_fields.items()}

    @classmethod
    def resolve(cls, overrides: Optional[dict[str, Any]] = None) -> "EditMethod":
        """The method with its defaults overridden by ``overrides`` (knob -> value).

        Raises:
            ConfigError: an unknown knob or an invalid value (the message names the knob's flag).
        """
        overrides = overrides or {}
        try:
            return cls(cls.Hparams.model_validate(overrides))
        except ValidationError as e:
            err = e.errors()[0]
            knob = ".".join(str(x) for x in err["loc"])
            flag = cls.knobs().get(knob) or f"ripple.hparams.{cls.name}.{knob}"
            if err["type"] == "extra_forbidden":
                raise ConfigError(f"{flag}: not a knob of --method {cls.name} (its knobs: "
                                  f"{', '.join(cls.Hparams.model_fields)}).") from None
            raise ConfigError(f"{flag} {overrides.get(knob)!r}: {err['msg']}.") from None

    @classmethod
    def knob_named(cls, name: Optional[str]) -> str:
        """The knob ``name`` names (the knob or its flag, :func:`gradcouple.config.canonical_knob`);
        None names :attr:`strength`.

        Raises:
            ConfigError: no knob of this method has that name.
        """
        if name is None:
            return cls.strength
        knob = canonical_knob(name, cls.knobs())
        if knob is None:
            raise ConfigError(f"--sweep {name}=...: not a knob of {cls.name} edits ({', '.join(cls.knobs())}).")
        return knob

    def with_knob(self, knob: str, value: float) -> "EditMethod":
        """The same method with ``knob`` set to ``value`` (a point of a sweep)."""
        return type(self)(self.hp.model_validate({**self.hp.model_dump(), knob: value}))

    def settings(self) -> dict[str, Any]:
        """The resolved hyperparameters, as recorded in the ripple summary."""
        return self.hp.model_dump(mode="json")

    def key_target(self, targets: list[Target]) -> Target:
        """The layer whose inputs are this method's keys (the activation and whitened-key predictors
        read it): the lowest target unless the method edits another."""
        return targets[0]

    def touched(self, targets: list[Target]) -> list[Target]:
        """The targets ``apply`` changes (the ones snapshotted and restored)."""
        return targets

    def check(self, targets: list[Target]) -> None:
        """Raise :class:`~gradcouple.errors.ArtifactError` when the run's target layers cannot take this method."""

    def prepare(self, ctx: EditContext) -> None:
        """Compute once, before the first edit, what every edit reads (what :attr:`needs` names), so a
        missing input fails before any edit is made and no edit's time includes it."""
        self.check(ctx.targets)
        if "covariance" in self.needs:
            ctx.covariance(self.key_target(ctx.targets))

    @abstractmethod
    def apply(self, ctx: EditContext, rewrites: list[Rewrite]) -> dict[str, torch.Tensor]:
        """Edit the model toward every rewrite's new target (together) and leave it edited.

        Returns Δθ per target of ``ctx.targets`` (zero for targets left alone), each (d_out, d_in')
        float32 on the CPU in the layout of :meth:`~gradcouple.layers.Target.weight_matrix`.
        """


METHODS: dict[str, type[EditMethod]] = {}
#: another name of a method -> its name
ALIASES: dict[str, str] = {}


def register_method(cls: type[EditMethod]) -> type[EditMethod]:
    """Class decorator: make ``cls`` available as ``--method cls.name`` (and its aliases)."""
    METHODS[cls.name] = cls
    ALIASES.update({alias: cls.name for alias in cls.aliases})
    return cls


def method_class(name: str) -> type[EditMethod]:
    """The registered method ``name``.

    Raises:
        ConfigError: no such method (the message lists the registered ones).
    """
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise ConfigError(f"--method {name}: not an edit method; use one of {', '.join(METHODS)}.")
    return METHODS[name]


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


@contextlib.contextmanager
def restored(targets: list[Target]) -> Iterator[None]:
    """Copy the weights of ``targets``, run the block, then put them back bit for bit (also when
    the block raises).

    Raises:
        RuntimeError: the weights could not be restored exactly (nothing after the edit may be trusted).
    """
    saved = snapshot(targets)
    try:
        yield
    finally:
        if not restore(targets, saved):
            raise RuntimeError("target weights could not be restored bit for bit")


@contextlib.contextmanager
def edited(method: EditMethod, ctx: EditContext, rewrites: list[Rewrite]) -> Iterator[dict[str, torch.Tensor]]:
    """The one way a stage applies an edit: ``with edited(method, ctx, rewrites) as delta:`` the model
    is edited inside the block (``delta``: Δθ per target) and restored bit for bit when it ends."""
    method.check(ctx.targets)
    with restored(method.touched(ctx.targets)):
        yield method.apply(ctx, rewrites)


def edit_norm(delta: dict[str, torch.Tensor]) -> float:
    """|Δθ| over every target (Frobenius, weights and biases together), computed in float64."""
    return float(sum((d.double() ** 2).sum() for d in delta.values()) ** 0.5)


def zero_delta(targets: list[Target]) -> dict[str, torch.Tensor]:
    """Δθ = 0 for every target: (d_out, d_in') float32 zeros."""
    return {t.name: torch.zeros(t.d_out, t.d_in_aug) for t in targets}


def check_target_index(method: str, index: int, targets: list[Target]) -> Target:
    """``targets[index]``.

    Raises:
        ArtifactError: no such target (the message names the knob and the count).
    """
    if not -len(targets) <= index < len(targets):
        raise ArtifactError(f"ripple.hparams.{method}.layer={index}: there are {len(targets)} target layers "
                            f"({targets[0].name} ... {targets[-1].name}).")
    return targets[index]


__all__ = ["ALIASES", "EditContext", "EditMethod", "Hparams", "METHODS", "Rewrite", "check_target_index", "edit_norm", "edited",
           "method_class", "register_method", "restore", "restored", "snapshot", "zero_delta"]
