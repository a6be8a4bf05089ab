"""The Python API for notebooks: each stage as a function of a run directory with keyword
overrides, and :func:`load_run`, a lazy, file-only view of a run as pandas tables.

    import gradcouple as gc
    gc.extract("runs/nb", data="pieces.jsonl", model="llama-tiny-random")
    gc.couple("runs/nb")
    run = gc.load_run("runs/nb")
    run.cosine.loc["musique:2hop__1:0"].nlargest(5)

pandas comes with ``datasets`` (a dependency already), so it is not declared separately.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from .artifacts import CouplingStats, Manifest
from .config import RunConfig, flag_names, load_config
from .datasets import download
from .errors import ConfigError
from .rundir import RunDir
from .stages import couple as couple_stage
from .stages import extract as extract_stage
from .stages import report as report_stage
from .stages import ripple as ripple_stage


def resolve_config(stage: str, run_dir: str | Path, cfg: Optional[RunConfig], overrides: dict[str, Any]) -> RunConfig:
    """``cfg`` (default: the run's saved config.json, else the defaults) with keyword overrides applied.

    A keyword is a CLI flag without its dashes (``model``, ``layers``, ``batch_size``, ``n_edits``, ...)
    or a dotted field (``"ripple.lr"``); a flag that names fields of several sections (``method``,
    ``top_k``) sets the one of ``stage``.

    Raises:
        ConfigError: an unknown keyword (the message lists the known ones) or an invalid value.
    """
    by_kw: dict[str, list[str]] = {}
    for field, flag in flag_names().items():
        by_kw.setdefault(flag.lstrip("-").replace("-", "_"), []).append(field)
    dotted = {}
    for key, value in overrides.items():
        if "." in key:
            dotted[key] = value
            continue
        fields = by_kw.get(key)
        if not fields:
            raise ConfigError(f"{stage}(): unknown keyword {key!r}; known: {', '.join(sorted(by_kw))}, or a dotted field "
                              f"such as 'ripple.lr'.")
        dotted[next((f for f in fields if f.startswith(stage + ".")), fields[0])] = value
    base = cfg.model_dump(mode="json") if cfg is not None else None
    if base is None:
        saved = RunDir(run_dir).saved_config_path()
        base = load_config(saved).model_dump(mode="json") if saved else RunConfig().model_dump(mode="json")
    for key, value in dotted.items():
        section, _, field = key.partition(".")
        base.setdefault(section, {})[field] = str(value) if isinstance(value, Path) else value
    return load_config(None, {k: v for s, fields in base.items() for k, v in
                              ((f"{s}.{f}", x) for f, x in fields.items())})


def extract(run_dir: str | Path, cfg: Optional[RunConfig] = None, *, overwrite: bool = False, **overrides):
    """:func:`gradcouple.stages.extract.extract` with keyword overrides; returns its ExtractResult."""
    return extract_stage.extract(resolve_config("extract", run_dir, cfg, overrides), run_dir, overwrite=overwrite, show_progress=False)


def couple(run_dir: str | Path, cfg: Optional[RunConfig] = None, **overrides):
    """:func:`gradcouple.stages.couple.couple` with keyword overrides; returns its CoupleResult."""
    return couple_stage.couple(resolve_config("couple", run_dir, cfg, overrides), run_dir, show_progress=False)


def ripple(run_dir: str | Path, cfg: Optional[RunConfig] = None, **overrides):
    """:func:`gradcouple.stages.ripple.ripple` with keyword overrides; returns its RippleResult."""
    return ripple_stage.ripple(resolve_config("ripple", run_dir, cfg, overrides), run_dir, show_progress=False)


def report(run_dir: str | Path, cfg: Optional[RunConfig] = None, **overrides):
    """:func:`gradcouple.stages.report.report` with keyword overrides; returns its ReportResult."""
    return report_stage.report(resolve_config("report", run_dir, cfg, overrides), run_dir)


class Run:
    """A run directory as tables. Every attribute loads on first access, from the run's files only.

    ``pieces``: one row per piece (pieces.jsonl fields plus the manifest's log-prob in nats, |g| and
    token counts); ``cosine``: the GradSim matrix as an (N, N) DataFrame indexed by piece id, or in
    top-k mode a long table (piece_id, neighbour_id, rank, cosine); ``gram``: the Gram matrix
    (full mode); ``stats``: the coupling statistics; ``pairs``: pairs.csv; ``ripple``: a dict of
    DataFrames (``edits``, and ``measurements`` or ``tests``) plus ``summary``, or None.
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
    def ripple(self) -> Optional[dict]:
        if not self.dir.ripple.exists():
            return None
        summary, rows = self.dir.ripple.load()
        lines = pd.DataFrame([r.model_dump() for r in rows])
        return {"summary": summary, "edits": pd.DataFrame([e.model_dump() for e in summary.edits]),
                "tests" if summary.mode == "benchmark" else "measurements": lines}


def load_run(path: str | Path) -> Run:
    """A lazy, file-only :class:`Run` of the run directory ``path``."""
    return Run(path)


__all__ = ["download", "extract", "couple", "ripple", "report", "load_run", "Run", "RunConfig", "resolve_config"]
