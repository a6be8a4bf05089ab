"""What every store kind provides, the blocks it loads for the Gram product, and the registry.

A store kind decides how one piece's per-example gradient on one target is written to a shard
(fp16, each piece-target block divided by its max-abs value with the fp32 scale beside it, since
fp16 keeps normal values only from 6.1e-5 to 65504) and how rows of it are read back: as a
compute-ready :class:`Block`, as squared norms, or contracted with a weight change. Adding a kind
means one new module that subclasses :class:`StoreKind` and calls :func:`register_store`, as
Opacus registers one grad sampler per layer type.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator, Optional

import torch

from ..artifacts import StoreSettings, TargetShape
from ..errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    from .shards import GradientReader


def scaled_fp16(t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``t / max|t|`` as float16 and the float32 scale (1.0 for an all-zero or non-finite block)."""
    s = float(t.abs().max()) if t.numel() else 0.0
    if s == 0.0 or not torch.isfinite(torch.tensor(s)):
        s = 1.0
    return (t / s).to(torch.float16), s


class Block:
    """Rows [start, stop) of one target, ready for inner products with another block of the same target."""

    def inner(self, other: "Block") -> torch.Tensor:
        """<G_i, G_j> for i in this block and j in ``other``: (n_self, n_other) float64."""
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def to(self, device: torch.device) -> "Block":
        """The same block with its tensors on ``device`` (e.g. a GPU, for couple --device cuda)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


@dataclass
class DenseBlock(Block):
    """Materialised gradients, one flattened row per piece: g (n, P) float32, scales applied."""

    g: torch.Tensor

    def inner(self, other: "Block") -> torch.Tensor:
        assert isinstance(other, DenseBlock)
        return (self.g @ other.g.t()).double()

    def nbytes(self) -> int:
        return self.g.numel() * self.g.element_size()


@dataclass
class FactoredBlock(Block):
    """Factors of n pieces concatenated along tokens: x (sum T, d_in') and d (sum T, d_out) float32,
    and s (n, sum T) float32 holding each piece's scale at its own tokens (a scaled one-hot).

    <G_i, G_j> = sum((X_i X_j^T) * (Delta_i Delta_j^T)) for the whole block pair with two matmuls
    and a segment sum (the "ghost" inner product; Opacus uses its diagonal for per-example norms).
    """

    x: torch.Tensor
    d: torch.Tensor
    s: torch.Tensor

    def inner(self, other: "Block") -> torch.Tensor:
        assert isinstance(other, FactoredBlock)
        k = (self.x @ other.x.t()) * (self.d @ other.d.t())
        return (self.s @ k @ other.s.t()).double()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.d, self.s))


@dataclass
class Direction:
    """A direction in one target's weight space, (d_out, d_in') with the bias column last: a dense
    ``matrix``, or the factored sum ``a @ b.T`` with ``a`` (d_out, r) and ``b`` (d_in', r).

    A piece's per-example gradient Delta^T X is ``a`` = Delta^T, ``b`` = X^T (r = its tokens); a
    rank-r weight change U V^T is ``a`` = U, ``b`` = V. Stored gradients are contracted with it by
    :meth:`StoreKind.contract`: for a factored direction that costs r (d_in' + d_out) multiply-adds
    per stored token, against d_in' d_out for a dense one (DESIGN.md, "Forecast").
    """

    matrix: Optional[torch.Tensor] = None
    a: Optional[torch.Tensor] = None
    b: Optional[torch.Tensor] = None

    @property
    def factored(self) -> bool:
        return self.matrix is None

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The direction as a (d_out, d_in') matrix of ``dtype``."""
        if self.matrix is not None:
            return self.matrix.to(dtype)
        return self.a.to(dtype) @ self.b.to(dtype).t()

    @classmethod
    def of_factors(cls, x: torch.Tensor, d: torch.Tensor) -> "Direction":
        """The gradient d^T x of factors x (T, d_in'), d (T, d_out), kept factored."""
        return cls(a=d.t(), b=x.t())

    @classmethod
    def of_matrix(cls, w: torch.Tensor, rtol: float = 1e-6) -> "Direction":
        """A (d_out, d_in') weight change, factored by its SVD (in float64) when its numerical rank,
        the singular values above ``rtol`` times the largest, makes the factored contraction cheaper;
        else kept dense. ROME's update is rank one, MEMIT's and AlphaEdit's rank at most the edits
        per layer; fine-tuning's is full. Dropping the singular values below ``rtol`` times the
        largest changes <G, D> by at most about ``rtol`` sqrt(dropped) |G| |D|. A non-finite ``w``
        stays dense (its scores show it); a zero one has rank 0."""
        d_out, d_in = w.shape
        if min(d_out, d_in) <= 1 or not bool(torch.isfinite(w).all()):
            return cls(matrix=w)  # a non-finite change stays dense, so its scores say so
        if not bool(w.any()):
            return cls(a=w.new_zeros(d_out, 0), b=w.new_zeros(d_in, 0))
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        r = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        if r * (d_in + d_out) >= d_in * d_out:
            return cls(matrix=w)
        return cls(a=u[:, :r] * s[:r], b=vh[:r].t())

    def is_zero(self) -> bool:
        """Whether the direction is 0 (a target an edit left alone): its contraction is 0 without reading."""
        if self.matrix is not None:
            return not bool(self.matrix.any())
        return self.a.shape[1] == 0 or not bool(self.a.any()) or not bool(self.b.any())

    def to(self, device: torch.device) -> "Direction":
        return Direction(*(t.to(device) if t is not None else None for t in (self.matrix, self.a, self.b)))


def token_contractions(x: torch.Tensor, d: torch.Tensor, direction: Direction, dtype: torch.dtype = torch.float32,
                       chunk: int = 1 << 13) -> torch.Tensor:
    """delta_t^T D x_t for every token t of factors x (T, d_in') and d (T, d_out), any float dtype: (T,)
    float64, computed in ``dtype`` on the direction's device, ``chunk`` tokens at a time (so the
    float copies of fp16 data stay small)."""
    dev = direction.a.device if direction.factored else direction.matrix.device
    if direction.factored:
        a, b = direction.a.to(dev, dtype), direction.b.to(dev, dtype)
    else:
        m = direction.matrix.to(dev, dtype)
    out = []
    for t0 in range(0, x.shape[0], chunk):
        xc, dc = x[t0:t0 + chunk].to(dev, dtype), d[t0:t0 + chunk].to(dev, dtype)
        if direction.factored:
            out.append(((dc @ a) * (xc @ b)).sum(1).double())
        else:
            out.append(((xc @ m.t()) * dc).sum(1).double())
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


class StoreKind(ABC):
    """One shard format. ``exact`` kinds reproduce inner products up to fp16 rounding."""

    name: ClassVar[str]
    exact: ClassVar[bool]
    keeps_inputs: ClassVar[bool] = False

    def __init__(self, settings: StoreSettings, targets: list[TargetShape]):
        self.targets = {t.name: t for t in targets}
        self.settings = settings

    @abstractmethod
    def encode(self, name: str, x: torch.Tensor, d: torch.Tensor) -> dict:
        """One piece's factors x (T, d_in') and d (T, d_out) float32 -> the arrays stored for it."""

    @abstractmethod
    def pack(self, name: str, encoded: list[dict]) -> dict[str, torch.Tensor]:
        """The shard entry of one target from its pieces' :meth:`encode` results."""

    @abstractmethod
    def load_block(self, reader: "GradientReader", start: int, stop: int, name: str, method: str) -> Block:
        """Rows [start, stop) (store order) of target ``name`` as a compute-ready block."""

    @abstractmethod
    def block_bytes(self, name: str, block_size: int, tokens_per_piece: float, method: str) -> tuple[float, float]:
        """Bytes of one loaded block of ``block_size`` pieces, and of the scratch of one block pair."""

    @abstractmethod
    def sq_norms(self, reader: "GradientReader", start: int, stop: int, name: str) -> torch.Tensor:
        """|G_i|^2 of rows [start, stop) from the stored data: (n,) float64."""

    @abstractmethod
    def contract(self, reader: "GradientReader", start: int, stop: int, name: str, direction: Direction,
                 keep: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """<G_i, D> of rows [start, stop) for a direction D in the target's weight space (a weight
        change, or another piece's gradient): (n,) float64, products in ``dtype`` (float32 or
        float64), sums over tokens in float64. ``keep`` ((n,) bool): the rows wanted; a kind may skip
        the others' work (their values are then 0)."""

    def contract_factors(self, name: str, x: torch.Tensor, d: torch.Tensor, direction: Direction,
                         dtype: torch.dtype = torch.float32) -> float:
        """<G, D> of a piece that is not stored, from its factors x (T, d_in'), d (T, d_out), as this kind
        scores its stored pieces (exact kinds: exactly; a sketching kind: through its sketch)."""
        return float(token_contractions(x, d, direction, dtype).sum())

    def plan(self, name: str, tokens_per_piece: float, block_size: int, requested: str) -> str:
        """The Gram algorithm of one target: 'dense' unless a kind can do better."""
        return "dense"

    def inputs(self, reader: "GradientReader", start: int, stop: int, name: str) -> torch.Tensor:
        """Stored layer inputs of rows [start, stop) as (sum T, d_in') float64 (kinds that keep them)."""
        raise ArtifactError(f"the {self.name} store keeps no layer inputs; extract with --store factors.")

    def row_slices(self, reader: "GradientReader", start: int, stop: int, name: str) -> Iterator[tuple[dict, int, int]]:
        """(shard entry of target ``name``, first row, end row within that shard) covering [start, stop)."""
        return reader.slices(start, stop, name)


STORES: dict[str, type[StoreKind]] = {}


def register_store(cls: type[StoreKind]) -> type[StoreKind]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    STORES[cls.name] = cls
    return cls


def store_kind(settings: StoreSettings, targets: list[TargetShape]) -> StoreKind:
    """The registered kind for ``settings.kind``, set up for ``targets``.

    Raises:
        ConfigError: no such kind.
    """
    if settings.kind not in STORES:
        raise ConfigError(f"--store {settings.kind!r}: unknown store kind; use one of {', '.join(STORES)}.")
    return STORES[settings.kind](settings, targets)
