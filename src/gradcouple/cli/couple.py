"""``gradcouple couple``: GradSim (gradient cosine) between every pair of pieces."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..ranks import is_main
from ..rundir import RunDir, default_run_dir
from .options import (
    ConfigOpt,
    DeviceOpt,
    LayersOpt,
    ModelOpt,
    ThreadsOpt,
    build_config,
    console,
    num,
    print_path,
    summary_table,
)

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
    max_memory: Annotated[Optional[float], typer.Option("--max-memory", help="Memory bound in GiB (default: a quarter of RAM); "
                                                        "a full N x N matrix over it is refused: pass --top-k.")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", help="Pieces per block.")] = None,
    top_pairs: Annotated[Optional[int], typer.Option("--top-pairs", help="Rows of pairs.csv and pairs_different_answer.csv (default 50).")] = None,
    method: Annotated[Optional[str], typer.Option(help="auto, factored or dense (factors store).")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Token limit of prompt+answer when couple extracts (with --model; default 256).")] = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Compute the GradSim matrix, stats.json and the most coupled pairs.

    With --model (and --data), the extraction it needs is made first, or reused when it is
    current: edited pieces, other settings or other model weights make it extract again.
    With --run alone, the gradients are those of RUN's extraction: --layers or --data other than
    its own are refused (they could not be honoured), and so is a --device other than cpu or cuda.
    """
    from ..stages import couple as stage  # deferred: torch and transformers (the stage), so `--help` stays fast
    from ..stages import extract as extraction

    overrides = {"model.name": model, "model.layers": layers, "model.device": device, "couple.top_k": top_k,
                 "couple.max_memory": max_memory, "couple.block_size": block_size, "couple.method": method,
                 "couple.top_pairs": top_pairs, "data.pieces": data, "extract.max_length": max_length,
                 "model.threads": threads}
    if run is None:
        if model is None:
            raise typer.BadParameter("give --run RUN_DIR, or --model M with --data PIECES.jsonl", param_hint="--run")
        run = default_run_dir(model, build_config(config, None, overrides))
    elif model is None:
        stage.check_extraction_flags(run, {k: v for k, v in (("--layers", layers), ("--data", data), ("--device", device),
                                                                          ("--max-length", max_length))
                                           if v is not None})
    cfg = build_config(config, run, overrides)
    if model is not None:
        ext = extraction.ensure_extraction(cfg, run, replace_stale=True)
        if ext.changed:
            console.print(f"the extraction in {run} was stale ({'; '.join(ext.changed)}): extracted again")
        elif not ext.reused:
            console.print(f"no matching extraction in {run}: extracted first")
    res = stage.couple(cfg, run)
    if not is_main():  # under torchrun rank 0 prints the summary
        return
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
    print_path(RunDir(run).coupling.stats_path)
