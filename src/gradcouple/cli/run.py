"""``gradcouple run``: download -> extract -> couple -> ripple -> report in one go."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ConfigError
from .options import (
    BatchSizeOpt,
    ConfigOpt,
    DeviceOpt,
    LayersOpt,
    LimitOpt,
    ModelOpt,
    OverwriteOpt,
    ThreadsOpt,
    build_config,
    console,
    interval,
    num,
    print_notes,
    print_path,
    summary_table,
)
from .ripple import benchmark_table, sweep_table

EPILOG = """Examples:

  gradcouple run --out runs/demo                      # bundled real samples, SmolLM2-135M, offline

  gradcouple run --data data/musique/pieces.jsonl --model gpt2 --layers all --out runs/gpt2

  gradcouple run --datasets musique,mquake-hard --n-edits 10 --out runs/mq

  gradcouple run --data data/rippleedits/pieces.jsonl --method rome --n-edits 40 --out runs/re
"""


def run(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/default"),
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="pieces.jsonl; default: the bundled real samples.")] = None,
    datasets: Annotated[Optional[str], typer.Option(help="Bundled samples to use when --data is not given (comma-separated; "
                                                    "default musique,hotpotqa,mquake-hard).", show_default=False)] = None,
    model: ModelOpt = None,
    layers: LayersOpt = None,
    store: Annotated[Optional[str], typer.Option(help="factors (default), dense or projected.")] = None,
    batch_size: BatchSizeOpt = None,
    limit: LimitOpt = None,
    edits: Annotated[Optional[str], typer.Option("--edits", help="Ripple mode: benchmark, pieces or auto (default: benchmark when the pieces carry edits).")] = None,
    n_edits: Annotated[Optional[int], typer.Option("--n-edits", "-n", help="Edits to make in the ripple stage (default 10).")] = None,
    method: Annotated[Optional[str], typer.Option(help="Edit method: ft (default) or rome.")] = None,
    no_ripple: Annotated[bool, typer.Option("--no-ripple", help="Skip the ripple stage.")] = False,
    device: DeviceOpt = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Token limit of prompt+answer (default 256).")] = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run every stage on real data with a real model and write an HTML report.

    A current extraction in OUT is reused; a stale one (edited pieces, other settings or
    model weights) is refused unless --overwrite.
    """
    from ..stages import pipeline  # deferred: torch and transformers (the stage), so `--help` stays fast

    if data is not None and datasets is not None:
        raise ConfigError(f"--datasets {datasets}: the bundled samples are read only without --data, and --data {data} was "
                          f"given; drop --datasets or --data.")
    if no_ripple:
        for flag, value in (("--edits", edits), ("--n-edits", n_edits), ("--method", method)):
            if value is not None:
                raise ConfigError(f"{flag} {value}: --no-ripple skips the ripple stage that {flag} sets up; drop {flag} "
                                  f"or --no-ripple.")
    t0 = time.perf_counter()
    cfg = build_config(config, None, {
        "data.pieces": data, "data.limit": limit, "model.name": model, "model.layers": layers, "model.device": device,
        "model.threads": threads, "extract.max_length": max_length, "extract.store": store, "extract.batch_size": batch_size, "ripple.edits": edits, "ripple.n_edits": n_edits,
        "ripple.method": method})
    if not no_ripple and cfg.ripple.method == "rome" and cfg.extract.store != "factors":
        raise ConfigError(f"--method rome: ROME's keys are the layer inputs that only --store factors keeps, and the store "
                          f"here is {cfg.extract.store}; drop --store {cfg.extract.store}, or use --method ft.")
    names = [d.strip() for d in datasets.split(",") if d.strip()] if datasets else list(pipeline.DEFAULT_SAMPLES)
    res = pipeline.run_pipeline(cfg, out, datasets=names, skip_ripple=no_ripple, overwrite=overwrite)
    if res.couple.mode != "full":
        console.print(f"[yellow]couple switched to {res.couple.mode}[/]: {res.couple.stats.note}", highlight=False)
    for stage, why in res.skipped.items():
        console.print(f"[yellow]{stage} skipped[/]: {why}")
    p = res.couple.stats.pairs
    rows = [("pieces", res.extract.n_pieces), ("model", cfg.model.name),
            ("extract", "reused (current)" if res.extract.reused else f"{res.extract.pieces_per_s:.1f} pieces/s"),
            ("mean GradSim", num(p.all.mean)),
            ("same- vs cross-question", f"{num(p.same_question.mean)} vs {num(p.cross_question.mean)}"),
            ("same- vs cross-question, different answers",
             f"{num(p.same_question_different_answer.mean)} vs {num(p.cross_question_different_answer.mean)}"),
            ("same-answer pairs", f"{num(p.same_answer.mean)} ({p.same_answer.n} pairs)")]
    if res.ripple is not None and res.ripple.sweep is not None:

        console.print(sweep_table(res.ripple.sweep))
    elif res.ripple is not None and res.ripple.summary.mode == "benchmark":

        console.print(benchmark_table(res.ripple.summary))
    elif res.ripple is not None:
        r = res.ripple.summary
        rows.append(("ripple Spearman's rho, coupling (95% CI)", interval(r.spearman_coupling)))
        rows.append(("ripple Spearman's rho, first order (95% CI)", interval(r.spearman_first_order)))
    rows.append(("wall time", f"{time.perf_counter() - t0:.1f} s"))
    console.print(summary_table(f"gradcouple run -> {out}", rows))
    print_notes(res.extract.device, res.extract.truncated, res.extract.n_pieces, cfg.extract.max_length)
    print_path(res.report.index_html)
