"""``gradcouple couple``: GradSim (gradient cosine) between every pair of pieces."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from ._common import ConfigOpt, DeviceOpt, LayersOpt, ModelOpt, build_config, console, handle_errors, num, print_path, summary_table

EPILOG = """Examples:

  gradcouple couple --run runs/musique

  gradcouple couple --model meta-llama/Llama-2-7b-hf --data data/musique/pieces.jsonl

  gradcouple couple --run runs/big --top-k 10 --max-memory 4
"""


def _matching_extraction(run: Path, cfg) -> bool:
    m = run / "gradients" / "manifest.json"
    if not m.is_file():
        return False
    man = json.loads(m.read_text(encoding="utf-8"))
    return bool(man.get("complete")) and man.get("config_hash") == cfg.extract_hash()


@app.command(epilog=EPILOG)
@handle_errors
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
    """Compute the GradSim matrix, stats.json and the most coupled pairs."""
    from ..couple import couple as run_couple
    from ..extract import extract as run_extract

    overrides = {"model.name": model, "model.layers": layers, "model.device": device, "couple.top_k": top_k,
                 "couple.max_memory": max_memory, "couple.block_size": block_size, "couple.method": method,
                 "data.pieces": str(data) if data else None}
    if run is None:
        if model is None:
            raise typer.BadParameter("give --run RUN_DIR, or --model M with --data PIECES.jsonl", param_hint="--run")
        cfg = build_config(config, None, overrides)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")
        run = Path("runs") / f"{slug}-{cfg.extract_hash()[:8]}"
    cfg = build_config(config, run, overrides)
    if model is not None and not _matching_extraction(run, cfg):
        console.print(f"no matching extraction in {run}: extracting first")
        run_extract(cfg, run)
    res = run_couple(cfg, run)
    s = res.stats
    rows = [("pieces", res.n), ("mode", res.mode), ("mean cosine", f"{num(s['mean'])} ± {num(s['std'])}"),
            ("min / max", f"{num(s['min'])} / {num(s['max'])}")]
    if "same_question" in s and s["same_question"]["mean"] is not None:
        rows.append(("same-question mean", f"{num(s['same_question']['mean'])} ({s['same_question']['pairs']} pairs)"))
    if "cross_question" in s and s["cross_question"]["mean"] is not None:
        rows.append(("cross-question mean", f"{num(s['cross_question']['mean'])} ({s['cross_question']['pairs']} pairs)"))
    for key, label in (("same_answer", "same-answer mean"), ("same_question_different_answer", "same-question, different answers"),
                       ("cross_question_different_answer", "cross-question, different answers")):
        if s.get(key, {}).get("mean") is not None:
            rows.append((label, f"{s[key]['mean']:.4f} ({s[key]['pairs']} pairs)"))
    rows.append(("time", f"{res.seconds:.1f} s"))
    console.print(summary_table("couple", rows))
    print_path(res.out_dir / "stats.json")
