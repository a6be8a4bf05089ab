"""``gradcouple ripple``: real edits, measured ripple effects, and how well coupling predicts them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import ConfigOpt, DeviceOpt, RunDirOpt, build_config, console, interval, num, print_path, summary_table

EPILOG = """Examples:

  gradcouple ripple --run runs/musique

  gradcouple ripple --run runs/mquake --edits 20 --steps 5 --lr 5e-4

  gradcouple ripple --run runs/mquake --method rome
"""


def ripple(
    run: RunDirOpt = Path("runs/default"),
    edits: Annotated[Optional[int], typer.Option("--edits", "-n", help="How many pieces to edit, one at a time.")] = None,
    method: Annotated[Optional[str], typer.Option(help="finetune (Adam on all target layers) or rome (rank-one update of one layer).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Adam steps per edit (finetune).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate of the edit.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the choice of edited pieces.")] = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Edit pieces toward counterfactual answers and compare predicted with measured ripple.

    The model, layers, prompt template, max length and batch size are those of the extraction
    in RUN; only the device can differ.
    """
    from .. import ripple as stage
    from ..rundir import RunDir

    cfg = build_config(config, run, {"ripple.n_edits": edits, "ripple.method": method, "ripple.steps": steps,
                                     "ripple.lr": lr, "ripple.seed": seed, "model.device": device})
    s = stage.ripple(cfg, run).summary
    console.print(summary_table("ripple", [
        ("edits", f"{s.n_edits} ({s.n_successful} successful)"),
        ("Spearman's rho, coupling (mean over edits, 95% CI)", interval(s.spearman_coupling)),
        ("Spearman's rho, first order (mean over edits, 95% CI)", interval(s.spearman_first_order)),
        ("Spearman's rho, coupling (pooled)", num(s.pooled.spearman_coupling, "+.3f")),
        ("precision@k (mean over edits, 95% CI)", interval(s.precision_at_k)),
        ("time", f"{s.seconds:.1f} s")]))
    print_path(RunDir(run).ripple_summary_path)
