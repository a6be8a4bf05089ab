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
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Iterator, Optional

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from ..config import canonical_knob
from ..errors import ArtifactError, ConfigError
from ..layers import Target, block_spec, find_blocks
from ..scoring import EncodedPiece
from .published import published_hparams, read_hparams_file

if TYPE_CHECKING:
    from ..stores import GradientReader


class Hparams(BaseModel):
    """Base of a method's hyperparameters: every field is a knob; ``json_schema_extra={"flag": ...}``
    gives the CLI flag (and API keyword) that sets it."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Rewrite:
    """One requested rewrite: the prompt with its NEW target as an encoded piece (``new.prompt``,
    ``new.answer``), the subject the prompt names (ROME's and MEMIT's key is at its last token;
    None: the last prompt token), and that token's position in ``new.ids`` where it was found."""

    new: EncodedPiece
    key_position: Optional[int] = None
    subject: Optional[str] = None


@dataclass
class EditContext:
    """What a method may use: the model, its tokenizer and its target layers (the extraction's),
    the stored gradients, and ``covariance(target)``, the key second moment C = E[k kᵀ] of a
    target's inputs ((d_in', d_in') float64, bias column last; computed once per target and kept).
    ``fingerprint`` names the weights (for caches that outlive the run), ``max_length`` is the
    extraction's token limit, ``memo`` keeps what a method computes once per run (context templates,
    null-space projections)."""

    model: torch.nn.Module
    targets: list[Target]
    pad_id: int
    reader: Optional["GradientReader"]
    covariance: Callable[[Target], torch.Tensor]
    tokenizer: Any = None
    #: compute the covariances of several targets at once (one pass over the text); None: one by one
    prefetch: Optional[Callable[[list[Target]], None]] = None
    fingerprint: str = ""
    max_length: int = 256
    seed: int = 0
    #: the value optimisation (ROME, MEMIT, AlphaEdit) runs each prompt from its lookup token on, the keys and
    #: values of what precedes it computed once (:class:`~gradcouple.edits.value.PrefixKV`); False: whole prompts
    prefix_cache: bool = True
    memo: dict[str, Any] = field(default_factory=dict)


def parse_layers(value: Any) -> Any:
    """A ``layers`` knob as a sorted list of block indices: 5, "4-8", "4,5,6", [4, 5] (None stays None)."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        out: list[int] = []
        for part in value.replace(" ", "").split(","):
            a, sep, b = part.partition("-")
            if not part:
                continue
            if not (a.isdigit() and (not sep or b.isdigit())):
                raise ValueError(f"{value!r} is not a block list such as 5, 4-8 or 4,5,6")
            out.extend(range(int(a), int(b) + 1) if sep else [int(a)])
        return sorted(set(out))
    return value


#: block indices of the layers a method edits: "4-8", "4,5", 5 or a list; None: the model's published setting
Layers = Annotated[Optional[list[int]], BeforeValidator(parse_layers)]


class EditMethod(ABC):
    """One edit method with resolved hyperparameters ``self.hp`` (``self.source``: where its
    defaults came from, a published settings file or the method's own)."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()  #: other names --method accepts for it
    summary: ClassVar[str]                  #: one line: the method and its source (paper, reference code)
    Hparams: ClassVar[type[Hparams]]
    strength: ClassVar[str]                 #: the knob ``--sweep`` varies
    #: what it reads beyond the model: "covariance" (the key covariance of the layer it edits)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: how it takes several rewrites: "together" (one update for all, MEMIT) or "one by one" (ROME)
    batch: ClassVar[str] = "together"
    #: whether apply's Δθ has rank at most the rewrites per edited layer (ROME, MEMIT, AlphaEdit): a
    #: forecast then factors it by its SVD (:meth:`gradcouple.stores.Direction.of_matrix`); fine-tuning's is full
    low_rank: ClassVar[bool] = False
    #: keys of the reference code's hparams files that its algorithm never reads (set aside by --hparams)
    unread: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, hp: Hparams, source: str = "the method's defaults"):
        self.hp = hp
        self.source = source
        #: what the last ``apply`` computed, per edited target name (ROME: u, k*, v*; MEMIT: K, R):
        #: float64 tensors on the CPU, for tests and for a reader who wants to see inside an edit
        self.trace: dict[str, dict[str, Any]] = {}

    @classmethod
    def knobs(cls) -> dict[str, str]:
        """knob -> its flag (``--lr``); knobs without a flag are set in a config file only."""
        return {name: (f.json_schema_extra or {}).get("flag", "") for name, f in cls.Hparams.model_fields.items()}

    @classmethod
    def layered(cls) -> bool:
        """Whether the method edits the blocks its ``layers`` knob names (else every target layer)."""
        return "layers" in cls.Hparams.model_fields

    @classmethod
    def default_layers(cls, n_blocks: int) -> Optional[list[int]]:
        """The blocks edited in a model of ``n_blocks`` blocks without published settings."""
        return None

    @classmethod
    def resolve(cls, overrides: Optional[dict[str, Any]] = None, model: Optional[torch.nn.Module] = None,
                file: Optional[str] = None) -> "EditMethod":
        """The method with its defaults overridden, in order, by the published settings for ``model``
        (``gradcouple/hparams/<method>/*.yaml``, matched by the model's config), by the settings
        ``file`` (``--hparams``; EasyEdit's YAML and ROME's JSON files are read as they are) and by
        ``overrides`` (knob -> value). With a model, ``layers`` left unset is chosen by depth.

        Raises:
            ConfigError: an unknown knob or an invalid value (the message names the knob's flag or
                the file and key).
        """
        values: dict[str, Any] = {}
        source = "the method's defaults"
        if model is not None:
            found, path = published_hparams(cls.name, model)
            if path is not None:
                values.update(found)
                source = f"gradcouple/hparams/{cls.name}/{path.name}"
        if file:
            values.update(read_hparams_file(file, cls))
            source = str(file)
        values.update(overrides or {})
        try:
            hp = cls.Hparams.model_validate(values)
        except ValidationError as e:
            err = e.errors()[0]
            knob = ".".join(str(x) for x in err["loc"])
            flag = cls.knobs().get(knob) or f"ripple.hparams.{cls.name}.{knob}"
            if err["type"] == "extra_forbidden":
                raise ConfigError(f"{flag}: not a knob of --method {cls.name} (its knobs: "
                                  f"{', '.join(cls.Hparams.model_fields)}).") from None
            raise ConfigError(f"{flag} {values.get(knob)!r}: {err['msg']}.") from None
        if model is not None and cls.layered() and getattr(hp, "layers") is None:
            n_blocks = len(find_blocks(model)[1])
            hp = hp.model_copy(update={"layers": cls.default_layers(n_blocks)})
            source += f" (layers by depth: no published settings for this model; see `gradcouple ripple --layer-sweep`)"
        return cls(hp, source)

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

    def with_knob(self, knob: str, value: Any) -> "EditMethod":
        """The same method with ``knob`` set to ``value`` (a point of a sweep)."""
        return type(self)(self.hp.model_validate({**self.hp.model_dump(), knob: value}), self.source)

    def settings(self) -> dict[str, Any]:
        """The resolved hyperparameters, as recorded in the ripple summary."""
        return self.hp.model_dump(mode="json")

    def key_target(self, targets: list[Target]) -> Target:
        """The layer whose inputs are this method's keys (the activation and whitened-key predictors
        read it): the lowest layer it edits."""
        return self.touched(targets)[0]

    def touched(self, targets: list[Target]) -> list[Target]:
        """The targets ``apply`` changes (the ones snapshotted and restored): the blocks of ``layers``,
        else every target."""
        if not self.layered():
            return targets
        return [t for t in targets if t.block in set(getattr(self.hp, "layers") or ())]

    def check(self, targets: list[Target]) -> None:
        """Refuse target layers this method cannot edit: a block of ``layers`` the extraction lacks.

        Raises:
            ArtifactError: one line naming the missing blocks and the ``--layers`` that extracts them.
        """
        if not self.layered():
            return
        layers = getattr(self.hp, "layers")
        if not layers:
            raise ConfigError(f"ripple.hparams.{self.name}.layers: no layer to edit; pass --edit-layers.")
        have = sorted({t.block for t in targets if t.block is not None})
        missing = [b for b in layers if b not in have]
        if missing:
            raise ArtifactError(f"--method {self.name} edits block{'s' if len(missing) > 1 else ''} "
                                f"{block_spec(missing)}, whose gradients the extraction lacks (it has blocks "
                                f"{block_spec(have) or 'none'}); extract with --layers {block_spec(sorted({*have, *layers}))}"
                                f" (`gradcouple run --method {self.name}` adds them), or pass --edit-layers "
                                f"within {block_spec(have)}.")

    def reset(self) -> None:
        """Forget what earlier edits left behind (AlphaEdit's key cache): called when the weights are restored."""

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
    try:
        with restored(method.touched(ctx.targets)):
            yield method.apply(ctx, rewrites)
    finally:
        method.reset()


def edit_norm(delta: dict[str, torch.Tensor]) -> float:
    """|Δθ| over every target (Frobenius, weights and biases together), computed in float64."""
    return float(sum((d.double() ** 2).sum() for d in delta.values()) ** 0.5)


def zero_delta(targets: list[Target]) -> dict[str, torch.Tensor]:
    """Δθ = 0 for every target: (d_out, d_in') float32 zeros."""
    return {t.name: torch.zeros(t.d_out, t.d_in_aug) for t in targets}


__all__ = ["ALIASES", "EditContext", "EditMethod", "Hparams", "METHODS", "Rewrite", "edit_norm", "edited",
           "method_class", "register_method", "restore", "restored", "snapshot", "zero_delta"]
