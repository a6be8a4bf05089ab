"""``gradcouple run``: download -> extract -> couple -> ripple -> report in one go."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from ._common import (ConfigOpt, DeviceOpt, LayersOpt, ModelOpt, OverwriteOpt, build_config, console, handle_errors, num,
                      print_path, summary_table)

EPILOG = """Examples:

  gradcouple run --out runs/demo                      # bundled real samples, SmolLM2-135M, offline

  gradcouple run --data data/musique/pieces.jsonl --model gpt2 --layers all --out runs/gpt2

  gradcouple run --datasets musique,mquake --edits 10 --out runs/mq
"""


@app.command(epilog=EPILOG)
@handle_errors
def run(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/default"),
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="pieces.jsonl; default: the bundled real samples.")] = None,
    datasets: Annotated[str, typer.Option(help="Bundled samples to use when --data is not given (comma-separated).")] = "musique,hotpotqa,mquake-hard",
    model: ModelOpt = None,
    layers: LayersOpt = None,
    store: Annotated[Optional[str], typer.Option(help="factors (default), dense or projected.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Pieces per forward/backward.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N pieces.")] = None,
    edits: Annotated[Optional[int], typer.Option("--edits", "-n", help="Pieces to edit in the ripple stage.")] = None,
    no_ripple: Annotated[bool, typer.Option("--no-ripple", help="Skip the ripple stage.")] = False,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run every stage on real data with a real model and write an HTML report."""
    from ..pipeline import run_pipeline

    t0 = time.perf_counter()
    cfg = build_config(config, None, {
        "data.pieces": str(data) if data else None, "data.limit": limit, "model.name": model, "model.layers": layers,
        "model.device": device, "extract.store": store, "extract.batch_size": batch_size, "ripple.n_edits": edits})
    res = run_pipeline(cfg, out, datasets=[d.strip() for d in datasets.split(",") if d.strip()],
                       skip_ripple=no_ripple, overwrite=overwrite)
    for stage, why in res.skipped.items():
        console.print(f"[yellow]{stage} skipped[/]: {why}")
    cs = res.couple.stats
    rows = [("pieces", res.extract.n_pieces), ("model", cfg.model.name),
            ("extract", f"{res.extract.pieces_per_s:.1f} pieces/s"),
            ("mean GradSim", f"{num(cs['mean'])}")]
    if cs.get("same_question", {}).get("mean") is not None:
        rows.append(("same- vs cross-question", f"{num(cs['same_question']['mean'])} vs {num(cs['cross_question']['mean'])}"))
    if cs.get("same_question_different_answer", {}).get("mean") is not None:
        rows.append(("same- vs cross-question, different answers",
                     f"{num(cs['same_question_different_answer']['mean'])} vs {num(cs['cross_question_different_answer']['mean'])}"))
    if cs.get("same_answer", {}).get("mean") is not None:
        rows.append(("same-answer pairs", f"{num(cs['same_answer']['mean'])} ({cs['same_answer']['pairs']} pairs)"))
    if res.ripple is not None:
        r = res.ripple.summary
        fmt = lambda x: "n/a" if x is None else f"{x:+.3f}"  # noqa: E731
        rows.append(("ripple Spearman rho (coupling / first order)",
                     f"{fmt(r['spearman_coupling_mean'])} / {fmt(r['spearman_first_order_mean'])}"))
    rows.append(("wall time", f"{time.perf_counter() - t0:.1f} s"))
    console.print(summary_table(f"gradcouple run -> {out}", rows))
    print_path(Path(out) / "report" / "index.html")
