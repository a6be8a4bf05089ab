"""All five stages in one process (the model is loaded once): ``gradcouple run``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .config import RunConfig
from .io import write_json
from .pieces import read_pieces, write_pieces

DEFAULT_SAMPLES = ("musique", "hotpotqa", "mquake-hard")


def sample_pieces(out_dir: Path, datasets: Sequence[str] = DEFAULT_SAMPLES) -> Path:
    """Convert the bundled real samples of ``datasets`` and merge them into ``out_dir/pieces.jsonl``.

    Needs no network. Piece ids carry their dataset, so the merge keeps them unique.
    """
    from .datasets import download

    merged = []
    for name in datasets:
        res = download(name, out_dir / name, from_path="sample")
        merged.extend(read_pieces(res.pieces_path))
    path = out_dir / "pieces.jsonl"
    write_pieces(path, merged)
    return path


@dataclass
class PipelineResult:
    run_dir: Path
    seconds: dict = field(default_factory=dict)
    extract: object = None
    couple: object = None
    ripple: object = None
    report: object = None
    skipped: dict = field(default_factory=dict)


def run_pipeline(cfg: RunConfig, run_dir: str | Path, *, datasets: Sequence[str] = DEFAULT_SAMPLES,
                 skip_ripple: bool = False, overwrite: bool = False, show_progress: bool = True) -> PipelineResult:
    """download (bundled samples, unless ``cfg.data.pieces`` is set) -> extract -> couple -> ripple -> report.

    Each stage writes its files before the next starts, so any stage can be rerun alone.
    Stage wall times in seconds are written to ``run_dir/timing.json``.
    """
    from .couple import couple
    from .extract import extract
    from .models import load_model
    from .report import report
    from .ripple import NothingToEdit, ripple

    run_dir = Path(run_dir)
    res = PipelineResult(run_dir)
    t = time.perf_counter()
    if cfg.data.pieces is None:
        cfg.data.pieces = sample_pieces(run_dir / "data", datasets)
    res.seconds["download"] = time.perf_counter() - t
    t = time.perf_counter()
    loaded = load_model(cfg.model.name, revision=cfg.model.revision, device=cfg.model.device, dtype=cfg.model.dtype)
    res.seconds["load_model"] = time.perf_counter() - t
    t = time.perf_counter()
    res.extract = extract(cfg, run_dir, loaded=loaded, overwrite=overwrite, show_progress=show_progress)
    res.seconds["extract"] = time.perf_counter() - t
    t = time.perf_counter()
    res.couple = couple(cfg, run_dir, show_progress=show_progress)
    res.seconds["couple"] = time.perf_counter() - t
    if not skip_ripple and res.couple.mode != "full":
        res.skipped["ripple"] = f"the coupling is {res.couple.mode} (too many pieces for the full matrix); ripple needs the full matrix"
    elif not skip_ripple:
        t = time.perf_counter()
        try:
            res.ripple = ripple(cfg, run_dir, loaded=loaded, show_progress=show_progress)
        except NothingToEdit as e:
            res.skipped["ripple"] = str(e)
        res.seconds["ripple"] = time.perf_counter() - t
    t = time.perf_counter()
    res.report = report(cfg, run_dir)
    res.seconds["report"] = time.perf_counter() - t
    write_json(run_dir / "timing.json", res.seconds)
    return res
