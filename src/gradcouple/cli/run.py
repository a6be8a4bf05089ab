"""``gradcouple run``: download -> extract -> couple -> ripple -> report in one go."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import (
    BatchSizeOpt,
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    EditsOpt,
    HparamsOpt,
    LayersOpt,
    LimitOpt,
    MaxLengthOpt,
    MethodOpt,
    ModelOpt,
    NEditsOpt,
    OverwriteOpt,
    StoreOpt,
    ThreadsOpt,
    console,
    gradsim_label,
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
    data: DataOpt = None,
    datasets: Annotated[Optional[str], typer.Option(help="Bundled samples to use when --data is not given (comma-separated; "
                                                    "default musique,hotpotqa,rippleedits:10; NAME:N takes a sample's first N records).", show_default=False)] = None,
    model: ModelOpt = None,
    layers: LayersOpt = None,
    store: StoreOpt = None,
    batch_size: BatchSizeOpt = None,
    limit: LimitOpt = None,
    edits: EditsOpt = None,
    n_edits: NEditsOpt = None,
    method: MethodOpt = None,
    hparams: HparamsOpt = None,
    no_ripple: Annotated[bool, typer.Option("--no-ripple", help="Skip the ripple stage.")] = False,
    device: DeviceOpt = None,
    max_length: MaxLengthOpt = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run every stage on real data with a real model and write an HTML report.

    A current extraction in OUT is reused; a stale one (edited pieces, other settings or
    model weights) is refused unless --overwrite. Like every stage, run starts from OUT's saved
    config.json when there is one.
    """
    from .. import api  # deferred: torch and transformers (the stages), so `--help` stays fast

    t0 = time.perf_counter()
    names = [d.strip() for d in datasets.split(",") if d.strip()] if datasets else None
    res = api.run(out, config=config, datasets=names, no_ripple=no_ripple, overwrite=overwrite, show_progress=True,
                  data=data, model=model, layers=layers, store=store, batch_size=batch_size, limit=limit, edits=edits,
                  n_edits=n_edits, method=method, hparams=hparams, device=device, max_length=max_length, threads=threads)
    if res.couple.mode != "full":
        console.print(f"[yellow]couple switched to {res.couple.mode}[/]: {res.couple.stats.note}", highlight=False)
    for stage, why in res.skipped.items():
        console.print(f"[yellow]{stage} skipped[/]: {why}")
    p, settings = res.couple.stats.pairs, res.extract.settings
    rows = [("pieces", res.extract.n_pieces), ("model", settings.model.name),
            ("extract", "reused (current)" if res.extract.reused else f"{res.extract.pieces_per_s:.1f} pieces/s"),
            (gradsim_label(res.couple.mode), num(p.all.mean)),
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
    print_notes(res.extract.device, res.extract.truncated, res.extract.n_pieces, settings.extract.max_length)
    print_path(res.report.index_html)
