"""``gradcouple couple``: GradSim (gradient cosine) between every pair of pieces."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..ranks import is_main
from .options import (
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    LayersOpt,
    MaxLengthOpt,
    ModelOpt,
    OverwriteOpt,
    ThreadsOpt,
    console,
    gradsim_label,
    num,
    opt,
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
    data: DataOpt = None,
    layers: LayersOpt = None,
    device: DeviceOpt = None,
    top_k: Annotated[Optional[int], opt("couple.top_k", "--top-k")] = None,
    max_memory: Annotated[Optional[float], opt("couple.max_memory", "--max-memory")] = None,
    block_size: Annotated[Optional[int], opt("couple.block_size", "--block-size")] = None,
    top_pairs: Annotated[Optional[int], opt("couple.top_pairs", "--top-pairs")] = None,
    method: Annotated[Optional[str], opt("couple.method", "--method")] = None,
    couple_layers: Annotated[Optional[str], opt("couple.layers", "--couple-layers")] = None,
    max_length: MaxLengthOpt = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Compute the GradSim matrix, stats.json and the most coupled pairs.

    With --model (and --data), the extraction it needs is made first, or reused when it is
    current: in a run directory named after the model and settings, where edited pieces or other
    model weights make it extract again; with --run, a stale extraction there is replaced only
    with --overwrite.
    With --run alone, the gradients are those of RUN's extraction: --layers, --data or
    --max-length other than its own are refused (they could not be honoured), and so is a
    --device other than cpu or cuda.
    """
    from .. import api  # deferred: torch and transformers (the stages), so `--help` stays fast

    if run is None and model is None:
        raise typer.BadParameter("give --run RUN_DIR, or --model M with --data PIECES.jsonl", param_hint="--run")
    res = api.couple(run, config=config, overwrite=overwrite, show_progress=True, model=model, data=data, layers=layers, device=device,
                     top_k=top_k, max_memory=max_memory, block_size=block_size, top_pairs=top_pairs, method=method,
                     couple_layers=couple_layers, max_length=max_length, threads=threads)
    if not is_main():  # under torchrun rank 0 prints the summary
        return
    ext = res.extract
    if ext is not None and ext.changed:
        console.print(f"the extraction in {ext.run_dir} was stale ({'; '.join(ext.changed)}): extracted again")
    elif ext is not None and not ext.reused:
        console.print(f"no matching extraction in {ext.run_dir}: extracted first")
    p = res.stats.pairs
    rows = [("pieces", res.n), ("mode", res.mode), (gradsim_label(res.mode), f"{num(p.all.mean)} ± {num(p.all.std)}"),
            ("min / max", f"{num(p.all.min)} / {num(p.all.max)}")]
    for label, d in (("same-question", p.same_question), ("cross-question", p.cross_question),
                     ("same-answer", p.same_answer), ("same-question, different answers", p.same_question_different_answer),
                     ("cross-question, different answers", p.cross_question_different_answer)):
        if d.mean is not None:
            rows.append((label, f"{num(d.mean)} ({d.n} pairs)"))
    rows.append(("time", f"{res.seconds:.1f} s"))
    console.print(summary_table("couple", rows))
    print_path(res.stats_json)
