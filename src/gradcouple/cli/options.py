"""Option aliases shared by the commands, the config they resolve to, and the summary printing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..config import load_config
from ..rundir import RunDir
from ..runinfo import overloaded

console = Console(stderr=True)

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
DataOpt = Annotated[Optional[Path], typer.Option("--data", "-d", help="pieces.jsonl from `gradcouple download`.")]
RunDirOpt = Annotated[Path, typer.Option("--run", "-r", help="Run directory made by `gradcouple extract --out` or `gradcouple run --out`.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace artifacts made from other inputs (pieces, settings, model).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N, mps, auto, or auto-map (spread a model larger than one GPU over every GPU).")]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Pieces per forward/backward.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Use only the first N pieces.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: torch's, which follows "
                                                   "OMP_NUM_THREADS); 1 when other processes share the cores.")]


def print_notes(device=None, truncated: tuple[int, int, int] = (0, 0, 0), n_pieces: int = 0, max_length: int = 0) -> None:
    """Warnings that end a stage summary: prompts cut to --max-length, a machine busier than its cores."""
    n, most, total = truncated
    if n:
        console.print(f"[yellow]warning:[/] {n} of {n_pieces} prompts were cut from the left to --max-length {max_length} tokens "
                      f"(by up to {most}, {total} in all); raise --max-length to score them whole.", highlight=False)
    if device is not None and (note := overloaded(device)):
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def layer_names(names: list[str]) -> str:
    """The selected target layers in a summary line: all when few, else the first and last with the count."""
    return ", ".join(names) if len(names) <= 2 else f"{len(names)}: {names[0]} ... {names[-1]}"


def build_config(config: Optional[Path], run_dir: Optional[Path], overrides: dict):
    """Resolve a RunConfig: ``--config`` file, else the run directory's saved config.json, then flags.

    ``overrides`` maps dotted fields (``"model.name"``) to flag values; None means "not given".
    """
    base = config if config is not None or run_dir is None else RunDir(run_dir).saved_config_path()
    return load_config(base, {k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()})


def summary_table(title: str, rows: list[tuple[str, object]]) -> Table:
    """A two-column rich table for the one-screen summary that ends every stage."""
    t = Table(title=title, show_header=False, title_justify="left", title_style="bold")
    t.add_column(style="cyan")
    t.add_column()
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def num(x, spec: str = ".4f") -> str:
    """Format a number for a summary table; None (e.g. a mean over no pairs) reads 'n/a'."""
    return "n/a" if x is None else format(x, spec)


def bracketed(value, low, high, spec: str = "+.3f") -> str:
    """'value [low, high]'; just the value without an interval; 'n/a' without a value."""
    if value is None:
        return "n/a"
    if low is None or high is None:
        return num(value, spec)
    return f"{num(value, spec)} [{num(low, spec)}, {num(high, spec)}]"


def interval(iv, spec: str = "+.3f") -> str:
    """An :class:`~gradcouple.metrics.Interval` as 'estimate [low, high]'."""
    return "n/a" if iv is None else bracketed(iv.estimate, iv.low, iv.high, spec)


def correlation(c, spec: str = "+.3f") -> str:
    """A :class:`~gradcouple.metrics.Correlation` as 'value [low, high]'."""
    return "n/a" if c is None else bracketed(c.value, c.ci_low, c.ci_high, spec)


def print_path(path: Path) -> None:
    """The stage's main output path, last, on stdout (for shell pipelines)."""
    typer.echo(str(path))
