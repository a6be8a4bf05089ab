"""``RUN/coupling/``: the GradSim matrix and what couple derives from it.

    gram.pt, cosine.pt            {"ids", "gram" | "cosine": (N, N) float64}, pieces.jsonl order (full mode)
    topk.pt                       {"ids", "indices" (N, k) int64, "cosine" (N, k) float32} (top-k mode)
    pairs.csv                     the most coupled pairs with both pieces' texts
    pairs_different_answer.csv    the same among pairs whose answers differ (full mode)
    stats.json                    CouplingStats, recording the gradients it was computed from
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import ValidationError

from ..artifacts import CouplingStats, Inputs, Manifest, PairRow
from ..config import RunConfig
from ..errors import ArtifactError
from ..io import atomic_open, atomic_torch_save, sha256_file, write_json
from .freshness import INPUT_LABELS, stale_inputs
from .read import read_model

if TYPE_CHECKING:
    from .layout import RunDir


class CouplingFiles:
    """The coupling files of one run directory."""

    def __init__(self, run: "RunDir"):
        self.run = run
        self.dir = run.root / "coupling"

    @property
    def gram_path(self) -> Path: return self.dir / "gram.pt"
    @property
    def cosine_path(self) -> Path: return self.dir / "cosine.pt"
    @property
    def topk_path(self) -> Path: return self.dir / "topk.pt"
    @property
    def pairs_path(self) -> Path: return self.dir / "pairs.csv"
    @property
    def pairs_different_answer_path(self) -> Path: return self.dir / "pairs_different_answer.csv"
    @property
    def stats_path(self) -> Path: return self.dir / "stats.json"

    def _couple(self, flags: str = "") -> str:
        return f"`gradcouple couple --run {self.run.root}{flags}`"

    def save_full(self, ids: list[str], gram: torch.Tensor, cosine: torch.Tensor) -> str:
        """Write gram.pt and cosine.pt; remove topk.pt. Returns cosine.pt's sha256."""
        atomic_torch_save({"ids": ids, "gram": gram}, self.gram_path)
        atomic_torch_save({"ids": ids, "cosine": cosine}, self.cosine_path)
        self.topk_path.unlink(missing_ok=True)
        return sha256_file(self.cosine_path)

    def save_topk(self, ids: list[str], indices: torch.Tensor, cosine: torch.Tensor) -> str:
        """Write topk.pt; remove the full-mode files. Returns topk.pt's sha256."""
        atomic_torch_save({"ids": ids, "indices": indices, "cosine": cosine}, self.topk_path)
        for stale in (self.cosine_path, self.gram_path, self.pairs_different_answer_path):
            stale.unlink(missing_ok=True)
        return sha256_file(self.topk_path)

    def matrix_path(self) -> Path:
        """cosine.pt in full mode, topk.pt in top-k mode.

        Raises:
            ArtifactError: neither exists.
        """
        for p in (self.cosine_path, self.topk_path):
            if p.is_file():
                return p
        raise ArtifactError(f"{self.cosine_path}: no coupling matrix (nor topk.pt); run {self._couple()} first.")

    def load_cosine(self) -> tuple[list[str], torch.Tensor]:
        """(ids, (N, N) float64 GradSim) in pieces.jsonl order.

        Raises:
            ArtifactError: not computed yet, or computed in top-k mode.
        """
        if not self.cosine_path.is_file():
            raise ArtifactError(f"{self.cosine_path}: no full coupling matrix; run {self._couple()} (without --top-k) first.")
        d = torch.load(self.cosine_path, weights_only=True, map_location="cpu")
        return list(d["ids"]), d["cosine"].double()

    def load_gram(self) -> torch.Tensor:
        """The (N, N) float64 Gram matrix <g_i, g_j> in pieces.jsonl order (full mode only)."""
        if not self.gram_path.is_file():
            raise ArtifactError(f"{self.gram_path}: no Gram matrix; run {self._couple()} (without --top-k).")
        return torch.load(self.gram_path, weights_only=True, map_location="cpu")["gram"].double()

    def load_topk(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(ids, indices (N, k) int64, cosine (N, k) float64)."""
        if not self.topk_path.is_file():
            raise ArtifactError(f"{self.topk_path}: no top-k coupling; run {self._couple(' --top-k K')}.")
        d = torch.load(self.topk_path, weights_only=True, map_location="cpu")
        return list(d["ids"]), d["indices"].long(), d["cosine"].double()

    def save_pairs(self, rows: list[PairRow], different_answer: bool = False) -> None:
        path = self.pairs_different_answer_path if different_answer else self.pairs_path
        with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(PairRow.model_fields))
            w.writeheader()
            for r in rows:
                w.writerow({**r.model_dump(), "cosine": f"{r.cosine:.6f}"})

    def load_pairs(self, different_answer: bool = False) -> list[PairRow]:
        """Rows of pairs.csv (or pairs_different_answer.csv; [] when that one is absent in top-k mode)."""
        path = self.pairs_different_answer_path if different_answer else self.pairs_path
        if not path.is_file():
            if different_answer:
                return []
            raise ArtifactError(f"{path}: no list of coupled pairs; run {self._couple()} first.")
        with open(path, encoding="utf-8", newline="") as fh:
            try:
                return [PairRow.model_validate({**r, "same_question": r["same_question"] == "True",
                                                "same_answer": r["same_answer"] == "True"}) for r in csv.DictReader(fh)]
            except (ValidationError, KeyError) as e:
                raise ArtifactError(f"{path}: not a pairs table ({e}); rerun {self._couple()}.") from None

    def save_stats(self, stats: CouplingStats) -> None:
        write_json(self.stats_path, stats.model_dump(mode="json"))

    def load_stats(self) -> CouplingStats:
        if not self.stats_path.is_file():
            raise ArtifactError(f"{self.stats_path}: no coupling statistics; run {self._couple()} first.")
        return read_model(self.stats_path, CouplingStats, f"rerun {self._couple()}.")

    @staticmethod
    def inputs(manifest: Manifest, cfg: RunConfig) -> Inputs:
        """What the coupling of this run must have been computed from now."""
        return Inputs(values={"gradients": manifest.fingerprint(), "config": cfg.couple_hash()})

    def current_stats(self, manifest: Manifest) -> CouplingStats:
        """The coupling statistics, checked against the gradients and the matrix file on disk.

        Raises:
            ArtifactError: absent, or computed from other gradients, or the matrix file was replaced;
                the message names what changed and the command that recomputes it.
        """
        stats = self.load_stats()
        changed = stale_inputs(Inputs(values={"gradients": stats.inputs.values.get("gradients", "")}),
                               Inputs(values={"gradients": manifest.fingerprint()}))
        path = self.matrix_path()
        if sha256_file(path) != stats.matrix_sha256:
            changed.append(f"{INPUT_LABELS['coupling']}: {self.run.relative(path)} differs from the one stats.json records")
        if changed:
            raise ArtifactError(f"{self.stats_path}: stale coupling ({'; '.join(changed)}); rerun {self._couple()}.")
        return stats


__all__ = ["CouplingFiles"]
