"""The run directory: its layout, its top-level files, and one owner per family of artifacts.

    RUN/pieces.jsonl    the pieces as extracted                 (extract)
    RUN/config.json     the resolved RunConfig                  (every stage)
    RUN/timing.json     stage wall times of `gradcouple run`
    RUN/data/           the bundled samples `gradcouple run` converted, when no --data was given
    RUN/.lock           held by the stage writing into the run  (lock.py)
    RUN/gradients/      manifest, shards, rank journals         (gradients.py)
    RUN/coupling/       GradSim matrix, pairs, statistics       (coupling.py)
    RUN/ripple/         measured ripple, journals, covariances  (ripple.py)
    RUN/forecast/       forecasts of edits, before they are made (forecast.py)
    RUN/report/         index.html, summary.json                (report.py)

Every artifact (typed in :mod:`gradcouple.artifacts`) records the fingerprints of its inputs, and
:func:`~gradcouple.rundir.freshness.stale_inputs` is the one rule that compares them. Only this
package builds a run path or parses a stored artifact.
"""

from __future__ import annotations

import contextlib
import re
from functools import cached_property
from pathlib import Path
from typing import Iterator, Optional

from ..config import RunConfig
from ..errors import ArtifactError
from ..io import write_json
from ..pieces import KnowledgePiece, read_pieces, write_pieces
from . import lock
from .coupling import CouplingFiles
from .forecast import ForecastFiles
from .gradients import GradientFiles
from .report import ReportFiles
from .ripple import RippleFiles


class RunDir:
    """One run directory: its top-level files, and :attr:`gradients`, :attr:`coupling`,
    :attr:`ripple`, :attr:`forecast`, :attr:`report`, each the one owner of its family of files."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @cached_property
    def gradients(self) -> GradientFiles: return GradientFiles(self)
    @cached_property
    def coupling(self) -> CouplingFiles: return CouplingFiles(self)
    @cached_property
    def ripple(self) -> RippleFiles: return RippleFiles(self)
    @cached_property
    def forecast(self) -> ForecastFiles: return ForecastFiles(self)
    @cached_property
    def report(self) -> ReportFiles: return ReportFiles(self)

    @property
    def pieces_path(self) -> Path: return self.root / "pieces.jsonl"
    @property
    def config_path(self) -> Path: return self.root / "config.json"
    @property
    def timing_path(self) -> Path: return self.root / "timing.json"
    @property
    def data_dir(self) -> Path: return self.root / "data"
    @property
    def lock_path(self) -> Path: return self.root / lock.LOCK_FILE

    @contextlib.contextmanager
    def lock(self, stage: str, create: bool = False) -> Iterator[None]:
        """Hold the run's lock while ``stage`` writes (:func:`gradcouple.rundir.lock.hold`)."""
        with lock.hold(self.root, stage, create):
            yield

    def relative(self, path: Path) -> str:
        """``path`` relative to the run directory, with forward slashes."""
        return Path(path).relative_to(self.root).as_posix()

    def files(self) -> list[tuple[str, int]]:
        """(relative path, bytes) of every finished file of the run, sorted (temp files left out)."""
        return [(self.relative(p), p.stat().st_size) for p in sorted(self.root.rglob("*"))
                if p.is_file() and not p.name.startswith(".")]

    def save_pieces(self, pieces: list[KnowledgePiece]) -> None:
        write_pieces(self.pieces_path, pieces)

    def load_pieces(self) -> list[KnowledgePiece]:
        """Raises: DataError (unreadable line), ArtifactError (absent)."""
        if not self.pieces_path.is_file():
            raise ArtifactError(f"{self.pieces_path}: no pieces; run `gradcouple extract --out {self.root}` first.")
        return read_pieces(self.pieces_path)

    def check_pieces_match(self, ids: list[str], what: Path) -> None:
        """Raises ArtifactError when ``ids`` (of ``what``) are not the run's pieces in order."""
        if ids != [p.id for p in self.load_pieces()]:
            raise ArtifactError(f"{what} does not match {self.pieces_path}; rerun `gradcouple couple --run {self.root}`.")

    def save_config(self, cfg: RunConfig) -> None:
        cfg.save(self.config_path)

    def saved_config_path(self) -> Optional[Path]:
        """config.json when the run has one (the base of flags given to a later stage)."""
        return self.config_path if self.config_path.is_file() else None

    def save_timing(self, seconds: dict[str, float]) -> None:
        write_json(self.timing_path, seconds)


def default_run_dir(model: str, cfg: RunConfig) -> Path:
    """``runs/<model>-<extraction hash>``: where ``couple --model`` works when no run directory is given."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")
    return Path("runs") / f"{slug}-{cfg.extract_hash()[:8]}"


__all__ = ["RunDir", "default_run_dir"]
