"""``gradcouple couple``: GradSim (gradient cosine) between every pair of pieces."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import ConfigOpt, DeviceOpt, LayersOpt, ModelOpt, build_config, console, num, print_path, summary_table

EPILOG = """Examples:

  gradcouple couple --run runs/musique

  gradcouple couple --model meta-llama/Llama-2-7b-hf --data data/musique/pieces.jsonl

  gradcouple couple --run runs/big --top-k 10 --max-memory 4
"""


def couple(
    run: Annotated[Optional[Path], typer.Option("--run", "-r", help="Run directory with gradients (from `gradcouple extract`).")] = None,
    model: ModelOpt = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="pieces.jsonl (with --model: extract first if needed).")] = None,
    layers: LayersOpt = None,
    device: DeviceOpt = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Keep the K most similar pieces per piece instead of N x N.")] = None,
    max_memory: Annotated[Optional[float], typer.Option("--max-memory", help="Memory bound in GiB (default: a quarter of RAM).")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", help="Pieces per block.")] = None,
    method: Annotated[Optional[str], typer.Option(help="auto, factored or dense (factors store).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Compute the GradSim matrix, stats.json and the most coupled pairs.

    With --model (and --data), the extraction it needs is made first, or reused when it is
    current: edited pieces, other settings or other model weights make it extract again.
    """
    from .. import couple as stage
    from .. import extract as extraction
    from ..rundir import RunDir, default_run_dir

    overrides = {"model.name": model, "model.layers": layers, "model.device": device, "couple.top_k": top_k,
                 "couple.max_memory": max_memory, "couple.block_size": block_size, "couple.method": method,
                 "data.pieces": data}
    if run is None:
        if model is None:
            raise typer.BadParameter("give --run RUN_DIR, or --model M with --data PIECES.jsonl", param_hint="--run")
        run = default_run_dir(model, build_config(config, None, overrides))
    cfg = build_config(config, run, overrides)
    if model is not None:
        ext = extraction.ensure_extraction(cfg, run, replace_stale=True)
        if ext.changed:
            console.print(f"the extraction in {run} was stale ({'; '.join(ext.changed)}): extracted again")
        elif not ext.reused:
            console.print(f"no matching extraction in {run}: extracted first")
    res = stage.couple(cfg, run)
    p = res.stats.pairs
    rows = [("pieces", res.n), ("mode", res.mode), ("mean GradSim", f"{num(p.all.mean)} ± {num(p.all.std)}"),
            ("min / max", f"{num(p.all.min)} / {num(p.all.max)}")]
    for label, d in (("same-question", p.same_question), ("cross-question", p.cross_question),
                     ("same-answer", p.same_answer), ("same-question, different answers", p.same_question_different_answer),
                     ("cross-question, different answers", p.cross_question_different_answer)):
        if d.mean is not None:
            rows.append((label, f"{num(d.mean)} ({d.n} pairs)"))
    rows.append(("time", f"{res.seconds:.1f} s"))
    console.print(summary_table("couple", rows))
    print_path(RunDir(run).stats_path)
