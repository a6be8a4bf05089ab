"""All five stages in one process (the model is loaded once): ``gradcouple run``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

from pydantic import BaseModel, ConfigDict

from ..config import RunConfig
from ..datasets import download
from ..edits import method_class
from ..errors import ConfigError
from ..layers import block_spec, find_blocks, parse_block_spec
from ..models import load_model
from ..pieces import read_pieces, write_pieces
from ..rundir import RunDir, locked
from . import couple as couple_stage
from . import extract as extract_stage
from . import report as report_stage
from . import ripple as ripple_stage
from .couple import CoupleResult
from .extract import ExtractResult
from .report import ReportResult
from .ripple import NothingToEdit, RippleResult

#: the demo's data: multi-hop questions for the coupling, and RippleEdits edits (several test queries each) to make
DEFAULT_SAMPLES = ("musique", "hotpotqa", "rippleedits:10")

log = logging.getLogger(__name__)


def with_edited_layers(cfg: RunConfig, model) -> RunConfig:
    """``cfg`` with the blocks the ripple's edit method edits extracted too, so the first-order
    predictor has gradients where the weights move; GradSim stays on the chosen layers
    (``couple.layers``). Unchanged when the method edits every target layer, the layers are a
    module regex, or the chosen blocks already hold the edited ones."""
    cls = method_class(cfg.ripple.method)
    if not cls.layered() or cfg.model.layers.startswith("re:") or cfg.ripple.layer_sweep:
        return cfg
    edited = cls.resolve(cfg.ripple.hparams.get(cls.name), model=model, file=cfg.ripple.hparams_file).hp.layers or []
    chosen = parse_block_spec(cfg.model.layers, len(find_blocks(model)[1]))
    if set(edited) <= set(chosen):
        return cfg
    union = block_spec(sorted({*chosen, *edited}))
    log.info(f"--method {cls.name} edits block{'s' if len(edited) > 1 else ''} {block_spec(edited)}: extracting blocks "
             f"{union} ({len(set(edited) - set(chosen))} more than --layers {cfg.model.layers}), GradSim over "
             f"{cfg.couple.layers or block_spec(chosen)}")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"layers": union}),
                                  "couple": cfg.couple.model_copy(update={"layers": cfg.couple.layers or block_spec(chosen)})})


def sample_pieces(out_dir: Path, datasets: Sequence[str] = DEFAULT_SAMPLES) -> Path:
    """Convert the bundled real samples of ``datasets`` and merge them into ``out_dir/pieces.jsonl``;
    ``NAME:N`` takes the first N records of a sample.

    Needs no network. Piece ids carry their dataset, so the merge keeps them unique.

    Raises:
        ConfigError: ``N`` is not a positive whole number (the message names ``--datasets``).
    """
    merged = []
    for spec in datasets:
        name, _, n = spec.partition(":")
        if n and not (n.isdigit() and int(n) > 0):
            raise ConfigError(f"--datasets {spec}: write NAME or NAME:N, N the number of records (a positive whole number).")
        res = download(name, out_dir / name, from_path="sample", limit=int(n) if n else None)
        merged.extend(read_pieces(res.pieces_path))
    path = out_dir / "pieces.jsonl"
    write_pieces(path, merged)
    return path


class PipelineResult(BaseModel):
    """Each stage's result (None when skipped, with the reason in ``skipped``) and wall times in seconds."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    run_dir: Path
    seconds: dict[str, float] = {}
    extract: ExtractResult
    couple: CoupleResult
    ripple: Optional[RippleResult] = None
    report: ReportResult
    skipped: dict[str, str] = {}


@locked("run")
def run_pipeline(cfg: RunConfig, run_dir: str | Path, *, datasets: Sequence[str] = DEFAULT_SAMPLES,
                 skip_ripple: bool = False, overwrite: bool = False, show_progress: bool = True) -> PipelineResult:
    """download (bundled samples, unless ``cfg.data.pieces`` is set) -> extract -> couple -> ripple -> report.

    The extraction is reused when current (:func:`~gradcouple.stages.extract.ensure_extraction`); a stale
    one is replaced only with ``overwrite``. Each stage writes its files before the next starts, so
    any stage can be rerun alone. Stage wall times in seconds go to ``run_dir/timing.json``.

    Raises:
        ConfigError: a stale extraction in ``run_dir`` without ``overwrite``.
    """
    run, seconds, skipped = RunDir(run_dir), {}, {}
    t = time.perf_counter()
    if cfg.data.pieces is None:  # a copy: the caller's config is not changed
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"pieces": sample_pieces(run.data_dir, datasets)})})
    seconds["download"] = time.perf_counter() - t
    t = time.perf_counter()
    loaded = load_model(cfg.model.name, revision=cfg.model.revision, device=cfg.model.device, dtype=cfg.model.dtype)
    seconds["load_model"] = time.perf_counter() - t
    if not skip_ripple:
        cfg = with_edited_layers(cfg, loaded.model)
    t = time.perf_counter()
    ext = extract_stage.ensure_extraction(cfg, run.root, loaded=loaded, replace_stale=overwrite, show_progress=show_progress)
    seconds["extract"] = time.perf_counter() - t
    t = time.perf_counter()
    cpl = couple_stage.couple(cfg, run.root, show_progress=show_progress, fallback_top_k=10)  # too many pieces: top 10, noted
    seconds["couple"] = time.perf_counter() - t
    rip = None
    if not skip_ripple and cpl.mode != "full":
        skipped["ripple"] = f"the coupling is {cpl.mode} (too many pieces for the full matrix); ripple needs the full matrix"
    elif not skip_ripple:
        t = time.perf_counter()
        try:
            rip = ripple_stage.ripple(cfg, run.root, loaded=loaded, show_progress=show_progress)
        except NothingToEdit as e:
            skipped["ripple"] = str(e)
        seconds["ripple"] = time.perf_counter() - t
    t = time.perf_counter()
    rep = report_stage.report(cfg, run.root)
    seconds["report"] = time.perf_counter() - t
    run.save_timing(seconds)
    return PipelineResult(run_dir=run.root, seconds=seconds, extract=ext, couple=cpl, ripple=rip, report=rep, skipped=skipped)
