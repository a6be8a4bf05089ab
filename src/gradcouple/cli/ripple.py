"""``gradcouple ripple``: real edits, measured ripple effects, and how well coupling predicts them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from ._common import ConfigOpt, DeviceOpt, RunDirOpt, build_config, console, handle_errors, print_path, summary_table

EPILOG = """Examples:

  gradcouple ripple --run runs/musique

  gradcouple ripple --run runs/mquake --edits 20 --steps 5 --lr 5e-4

  gradcouple ripple --run runs/mquake --method rome
"""


def _f(x) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


@app.command(epilog=EPILOG)
@handle_errors
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
    """Edit pieces toward counterfactual answers and compare predicted with measured ripple."""
    from ..ripple import ripple as run_ripple

    cfg = build_config(config, run, {"ripple.n_edits": edits, "ripple.method": method, "ripple.steps": steps, "ripple.lr": lr,
                                     "ripple.seed": seed, "model.device": device})
    res = run_ripple(cfg, run)
    s = res.summary
    console.print(summary_table("ripple", [
        ("edits", f"{s['n_edits']} ({s['n_successful']} successful)"),
        ("Spearman rho, coupling (mean ± std over edits)",
         f"{_f(s['spearman_coupling_mean'])} ± {s['per_edit']['spearman_coupling']['std'] or 0:.3f}"),
        ("Spearman rho, first order (mean over edits)", _f(s["spearman_first_order_mean"])),
        ("Spearman rho, coupling (pooled)", _f(s["pooled"]["spearman_coupling"])),
        ("precision@k (mean)", _f(s["precision_at_k_mean"])),
        ("time", f"{s['seconds']:.1f} s")]))
    print_path(res.out_dir / "summary.json")
