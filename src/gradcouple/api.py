"""The Python API for notebooks, and what every CLI command calls: each stage as a plain function
of a run directory with the CLI's flags as keywords, and :func:`load_run`, a lazy, file-only view
of a run as pandas tables.

    import gradcouple as gc
    gc.extract("runs/nb", data="pieces.jsonl", model="llama-tiny-random")
    gc.couple("runs/nb")
    run = gc.load_run("runs/nb")
    run.cosine.loc["musique:2hop__1:0"].nlargest(5)

A keyword is a flag without its dashes (``n_edits=3``) or a dotted field (``**{"ripple.covariance":
"pieces"}``); one that does not apply to the stage, or that the stage could not honour, is refused
with the CLI's own message (:func:`gradcouple.resolve.resolve`). pandas comes with ``datasets``
(a dependency already), so it is not declared separately.
"""

from __future__ import annotations

import json
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from .artifacts import CouplingStats, Manifest
from .config import RunConfig, load_config
from .datasets import download
from .errors import ConfigError
from .io import check_directory
from .resolve import resolve
from .rundir import RunDir, default_run_dir
from .stages import couple as couple_stage
from .stages import extract as extract_stage
from .stages import forecast as forecast_stage
from .stages import pipeline
from .stages import report as report_stage
from .stages import ripple as ripple_stage
from .stages.couple import CoupleResult
from .stages.extract import ExtractResult
from .stages.forecast import ForecastResult
from .stages.pipeline import PipelineResult
from .stages.report import ReportResult
from .stages.ripple import RippleResult

Where = Optional[str | Path]


def extract(run_dir: str | Path, cfg: Optional[RunConfig] = None, *, config: Where = None, overwrite: bool = False,
            show_progress: bool = False, **keywords: Any) -> ExtractResult:
    """Per-piece gradients into ``run_dir/gradients`` (:func:`gradcouple.stages.extract.extract`).

    ``cfg`` replaces the run's saved config as the base of ``keywords``; ``config`` is a YAML file
    whose settings count as given. Raises as :func:`~gradcouple.resolve.resolve` and the stage.
    """
    check_directory(run_dir, "--out")
    resolved = resolve("extract", run_dir, cfg=cfg, config=config, **keywords)
    return extract_stage.extract(resolved, run_dir, overwrite=overwrite, show_progress=show_progress)


def couple(run_dir: Where = None, cfg: Optional[RunConfig] = None, *, config: Where = None, overwrite: bool = False,
           show_progress: bool = False, **keywords: Any) -> CoupleResult:
    """GradSim of every pair of pieces (:func:`gradcouple.stages.couple.couple`).

    With ``model=`` (and ``data=``) the extraction it needs is made first, or reused when it is
    current, in ``run_dir`` or, without one, in ``runs/<model>-<settings hash>``; the result's
    ``extract`` says which. The gradients of ``run_dir`` are replaced only with ``overwrite``; those
    of the directory named after the settings are replaced when their pieces file or model weights
    changed. Without ``model=`` the gradients are those of ``run_dir``'s extraction, and extraction
    settings other than its own are refused.

    Raises:
        ConfigError: neither ``run_dir`` nor ``model=``; as :func:`~gradcouple.resolve.resolve`.
    """
    model, mine = keywords.get("model"), run_dir is None
    if run_dir is not None:
        check_directory(run_dir, "--run")
    if run_dir is None:
        if model is None:
            raise ConfigError("couple: give --run RUN_DIR, or --model M with --data PIECES.jsonl.")
        run_dir = default_run_dir(model, resolve("couple", None, cfg=cfg, config=config, **keywords))
    resolved = resolve("couple", run_dir, cfg=cfg, config=config, **keywords)
    ext = None
    if model is not None:
        ext = extract_stage.ensure_extraction(resolved, run_dir, replace_stale=mine or overwrite, show_progress=show_progress)
    res = couple_stage.couple(resolved, run_dir, show_progress=show_progress)
    res.extract = ext
    return res


def ripple(run_dir: str | Path, cfg: Optional[RunConfig] = None, *, config: Where = None, show_progress: bool = False,
           **keywords: Any) -> RippleResult:
    """Real edits and their measured ripple effect (:func:`gradcouple.stages.ripple.ripple`);
    ``sweep=[...]`` makes the same benchmark edits at several strengths."""
    check_directory(run_dir, "--run")
    resolved = resolve("ripple", run_dir, cfg=cfg, config=config, **keywords)
    return ripple_stage.ripple(resolved, run_dir, show_progress=show_progress)


def forecast(run_dir: str | Path, edits: Optional[str | Path | Sequence[dict]] = None, cfg: Optional[RunConfig] = None, *,
             config: Where = None, edit: Optional[str] = None, target: Optional[str] = None, subject: Optional[str] = None,
             format: Optional[str] = None, skip_bad: bool = False, show_progress: bool = False,
             **keywords: Any) -> pd.DataFrame:
    """Which stored pieces each edit will move, before it is made: :func:`forecast_result`'s rows as a DataFrame.

    ``edits``: a file of edit requests (EasyEdit / KnowEdit JSON, CounterFact, MQuAKE, RippleEdits or
    gradcouple pieces with role ``edit``), or such records as a list of dicts; or one edit as
    ``edit=PROMPT, target=NEW`` (``subject=S`` for ROME's key). Keywords are the CLI's flags
    (``predictor="gradsim,first_order"``, ``top_k=20``, ``verify=10``, ``method="rome"``).

    Returns one row per (edit, predictor, piece listed): the top ``top_k`` by |score|, the edit's own
    tests and, with ``verify``, every measured piece with its ``change`` (nats); the run's
    ``forecast/summary.json`` holds the statistics. Raises as :func:`forecast_result`.
    """
    return forecast_result(run_dir, edits, cfg, config=config, edit=edit, target=target, subject=subject, format=format,
                           skip_bad=skip_bad, show_progress=show_progress, **keywords).table()


def forecast_result(run_dir: str | Path, edits: Optional[str | Path | Sequence[dict]] = None,
                    cfg: Optional[RunConfig] = None, *, config: Where = None, edit: Optional[str] = None,
                    target: Optional[str] = None, subject: Optional[str] = None, format: Optional[str] = None,
                    skip_bad: bool = False, show_progress: bool = False, **keywords: Any) -> ForecastResult:
    """:func:`gradcouple.stages.forecast.forecast` on the edit requests of ``edits`` (or one edit), as
    :func:`forecast` takes them; returns the :class:`~gradcouple.stages.forecast.ForecastResult`.

    Raises:
        ConfigError: neither ``edits`` nor ``edit``/``target``, or both; as :func:`~gradcouple.resolve.resolve`.
        DataError: a malformed record (file, record, field), or no edit survived the checks.
    """
    check_directory(run_dir, "--run")
    resolved = resolve("forecast", run_dir, cfg=cfg, config=config, **keywords)
    if edits is not None and (edit is not None or target is not None):
        raise ConfigError("forecast: --edits FILE and --edit/--target were both given; give one of them.")
    if edits is None and edit is None and target is None:
        raise ConfigError("forecast: nothing to forecast; give --edits FILE, or one edit with --edit PROMPT --target NEW.")
    if edits is None:
        requests, fmt, skipped, path = [forecast_stage.single_edit(edit, target, subject)], None, {}, None
    elif isinstance(edits, (str, Path)):
        requests, fmt, skipped = forecast_stage.read_requests(edits, format, skip_bad)
        path = edits
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "records-given-to-gc.forecast.json"  # the name error messages show
            path.write_text(json.dumps(list(edits)), encoding="utf-8")
            requests, fmt, skipped = forecast_stage.read_requests(path, format, skip_bad)
        path = None
    return forecast_stage.forecast(resolved, run_dir, requests, edits_file=path, format=fmt, skipped=skipped,
                                   show_progress=show_progress)


def report(run_dir: str | Path, cfg: Optional[RunConfig] = None, *, config: Where = None, **keywords: Any) -> ReportResult:
    """The report page and summary.json (:func:`gradcouple.stages.report.report`)."""
    check_directory(run_dir, "--run")
    return report_stage.report(resolve("report", run_dir, cfg=cfg, config=config, **keywords), run_dir)


def run(run_dir: str | Path, cfg: Optional[RunConfig] = None, *, config: Where = None,
        datasets: Optional[Sequence[str]] = None, no_ripple: bool = False, overwrite: bool = False,
        show_progress: bool = False, **keywords: Any) -> PipelineResult:
    """Every stage with one model load (:func:`gradcouple.stages.pipeline.run_pipeline`): on ``data=``,
    or on the bundled samples of ``datasets`` (default musique, hotpotqa and the first 10 RippleEdits records; ``NAME:N`` takes N records)."""
    check_directory(run_dir, "--out")
    resolved = resolve("run", run_dir, cfg=cfg, config=config, options={"datasets": datasets, "no_ripple": no_ripple},
                       **keywords)
    return pipeline.run_pipeline(resolved, run_dir, datasets=list(datasets or pipeline.DEFAULT_SAMPLES),
                                 skip_ripple=no_ripple, overwrite=overwrite, show_progress=show_progress)


class Run:
    """A run directory as tables. Every attribute loads on first access, from the run's files only.

    ``pieces``: one row per piece (pieces.jsonl fields plus the manifest's log-prob in nats, |g| and
    token counts); ``cosine``: the GradSim matrix as an (N, N) DataFrame indexed by piece id, or in
    top-k mode a long table (piece_id, neighbour_id, rank, cosine); ``gram``: the Gram matrix
    (full mode); ``stats``: the coupling statistics; ``pairs``: pairs.csv; ``ripples``: every ripple
    result set by name, each a dict of DataFrames (``edits``, and ``measurements`` or ``tests``)
    plus ``summary``; ``ripple``: the most recent of them, or None; ``ripple_results``: one row per set.
    """

    def __init__(self, path: str | Path):
        self.dir = RunDir(path)

    def __repr__(self) -> str:
        return f"Run({str(self.dir.root)!r})"

    @cached_property
    def manifest(self) -> Manifest:
        return self.dir.gradients.load_manifest()

    @cached_property
    def config(self) -> Optional[RunConfig]:
        saved = self.dir.saved_config_path()
        return load_config(saved) if saved else None

    @cached_property
    def pieces(self) -> pd.DataFrame:
        df = pd.DataFrame([p.model_dump(mode="json") for p in self.dir.load_pieces()])
        rec = pd.DataFrame([{"id": r.id, "scored_prompt": r.prompt, "scored_answer": r.answer, "logprob": r.logprob,
                             "grad_norm": r.norm, "n_prompt_tokens": r.n_prompt_tokens, "n_answer_tokens": r.n_answer_tokens}
                            for r in self.manifest.records()])
        return df.merge(rec, on="id", how="left")

    @cached_property
    def stats(self) -> CouplingStats:
        return self.dir.coupling.load_stats()

    @cached_property
    def cosine(self) -> pd.DataFrame:
        if self.dir.coupling.cosine_path.is_file():
            ids, cos = self.dir.coupling.load_cosine()
            return pd.DataFrame(cos.numpy(), index=ids, columns=ids)
        ids, idx, cos = self.dir.coupling.load_topk()
        return pd.DataFrame([{"piece_id": ids[i], "neighbour_id": ids[int(j)], "rank": r + 1, "cosine": float(c)}
                             for i in range(len(ids)) for r, (j, c) in enumerate(zip(idx[i].tolist(), cos[i].tolist()))])

    @cached_property
    def gram(self) -> pd.DataFrame:
        ids = [r.id for r in self.manifest.records()]
        return pd.DataFrame(self.dir.coupling.load_gram().numpy(), index=ids, columns=ids)

    @cached_property
    def pairs(self) -> pd.DataFrame:
        return pd.DataFrame([r.model_dump() for r in self.dir.coupling.load_pairs()])

    @cached_property
    def ripples(self) -> dict[str, dict]:
        """Every ripple result set by name (``ft-3fa9c2d1``), oldest first: each a dict of ``summary``,
        ``edits`` and ``tests`` (benchmark mode) or ``measurements`` (pieces mode) DataFrames."""
        out = {}
        for results in self.dir.ripple.sets():
            if results.exists():
                summary, rows = results.load()
                lines = pd.DataFrame([r.model_dump() for r in rows])
                out[results.name] = {"summary": summary, "edits": pd.DataFrame([e.model_dump() for e in summary.edits]),
                                     "tests" if summary.mode == "benchmark" else "measurements": lines}
        return out

    @cached_property
    def ripple(self) -> Optional[dict]:
        """The most recent ripple result set (see :attr:`ripples`), or None when ripple was not run."""
        return list(self.ripples.values())[-1] if self.ripples else None

    @cached_property
    def ripple_results(self) -> pd.DataFrame:
        """One row per ripple result set, side by side: name, method, knobs, mode, edits, successful."""
        return pd.DataFrame([{"name": name, "method": r["summary"].method, "hparams": r["summary"].hparams,
                              "mode": r["summary"].mode, "n_edits": r["summary"].n_edits,
                              "n_successful": r["summary"].n_successful} for name, r in self.ripples.items()],
                            columns=["name", "method", "hparams", "mode", "n_edits", "n_successful"])


def load_run(path: str | Path) -> Run:
    """A lazy, file-only :class:`Run` of the run directory ``path``."""
    return Run(path)


__all__ = ["download", "extract", "couple", "ripple", "report", "run", "load_run", "Run", "RunConfig"]
