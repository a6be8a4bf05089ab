"""Shared option aliases and the one place that turns known errors into a readable line."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Callable, Optional, TypeVar

import typer
from rich.console import Console

from ..errors import GradcoupleError

console = Console(stderr=True)
F = TypeVar("F", bound=Callable)

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config (sections data/model/extract/couple/ripple/report); flags override it.", exists=True, dir_okay=False),
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Hub id, local directory, .gguf file, or alias: smollm2-135m (default; SmolLM2-135M-Instruct, "
                 "Q4_1 GGUF dequantised to float32), gemma3-270m, gpt2-tiny-random, llama-tiny-random."),
]
LayersOpt = Annotated[
    Optional[str],
    typer.Option("--layers", "-l", help="Target blocks: 'last4' (default), 'all', a range '26-29', a list '0,5,11', or a module-name regex 're:...'."),
]
RunDirOpt = Annotated[Path, typer.Option("--run", "-r", help="Run directory made by `gradcouple extract --out` or `gradcouple run --out`.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace artifacts made under a different configuration.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N, mps or auto.")]


def handle_errors(fn: F) -> F:
    """Print a GradcoupleError as one red line and exit with its code (traceback with GRADCOUPLE_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GradcoupleError as e:
            if os.environ.get("GRADCOUPLE_DEBUG"):
                raise
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: completed shards are kept; rerun the same command to resume.")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


FLAG_NAMES = {
    "data.pieces": "--data", "data.limit": "--limit", "model.name": "--model", "model.layers": "--layers",
    "model.module": "--module", "model.device": "--device", "model.dtype": "--dtype", "extract.store": "--store",
    "extract.proj_dim": "--proj-dim", "extract.proj_blocks": "--proj-blocks", "extract.batch_size": "--batch-size",
    "extract.shard_size": "--shard-size", "couple.top_k": "--top-k", "couple.max_memory": "--max-memory",
    "couple.block_size": "--block-size", "couple.method": "--method", "ripple.n_edits": "--edits", "ripple.method": "--method",
    "ripple.steps": "--steps", "ripple.lr": "--lr", "ripple.seed": "--seed",
}


def build_config(config: Optional[Path], run_dir: Optional[Path], overrides: dict):
    """Resolve a RunConfig: ``--config`` file, else the run directory's saved config.json, then flags."""
    from ..config import load_config

    base = config
    if base is None and run_dir is not None and (Path(run_dir) / "config.json").is_file():
        base = Path(run_dir) / "config.json"
    return load_config(base, overrides, FLAG_NAMES)


def summary_table(title: str, rows: list[tuple[str, object]]):
    """A two-column rich table for the one-screen summary that ends every stage."""
    from rich.table import Table

    t = Table(title=title, show_header=False, title_justify="left", title_style="bold")
    t.add_column(style="cyan")
    t.add_column()
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def num(x, spec: str = ".4f") -> str:
    """Format a number for a summary table; None (e.g. a mean over no pairs) reads 'n/a'."""
    return "n/a" if x is None else format(x, spec)


def print_path(path: Path) -> None:
    """The stage's main output path, last, on stdout (for shell pipelines)."""
    typer.echo(str(path))
