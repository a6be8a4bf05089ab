"""``gradcouple download``: a multi-hop QA dataset -> ``DIR/pieces.jsonl`` (+ ``download.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from .. import datasets as ds
from ..errors import ConfigError, DataError
from .options import console

EPILOG = """\
Examples:

  gradcouple download --list

  gradcouple download musique --sample --out data/musique          # bundled real sample, no network

  gradcouple download hotpotqa --split validation --limit 500      # from the Hugging Face Hub

  gradcouple download --from my_facts.jsonl --format pieces --out data/mine

  gradcouple download musique --from musique_full_v1.0_dev.jsonl --skip-bad

  gradcouple download rippleedits --from popular.json --out data/rippleedits   # edits + test queries

  pieces=$(gradcouple download musique --sample --out d | tail -1)  # the pieces path is the last stdout line
"""


def download(
    dataset: Annotated[Optional[str], typer.Argument(help="Dataset name or alias (see --list); optional with --from.", show_default=False)] = None,
    from_path: Annotated[Optional[str], typer.Option("--from", metavar="PATH", help="Local .json/.jsonl/.parquet file or dataset directory instead of the Hub.", show_default=False)] = None,
    format: Annotated[Optional[str], typer.Option("--format", metavar="NAME", help=f"Record format: {', '.join(ds.FORMATS)} (sniffed from the first record if omitted).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Output directory (default: data/DATASET).", show_default=False)] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Split to read (default: the dataset's, marked * in --list).", show_default=False)] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit).", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Read at most this many records.", show_default=False)] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed records (counted by reason) instead of stopping at the first.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the known datasets and exit.")] = False,
    sample: Annotated[bool, typer.Option("--sample", help="Use the small real sample bundled with gradcouple (no network).")] = False,
) -> None:
    """Split a multi-hop QA dataset into knowledge pieces: DIR/pieces.jsonl and DIR/download.json.

    Reads HotpotQA, MuSiQue, 2WikiMultiHopQA, WikiHop, Bamboogle, MQuAKE or RippleEdits from the
    Hugging Face Hub, a local file, or the bundled sample; or a plain pieces file (prompt, answer,
    ...) of your own facts. RippleEdits and MQuAKE pieces carry their benchmark's edits and test
    queries, which `gradcouple ripple` evaluates. The pieces path is printed last on stdout;
    everything else goes to stderr.
    """
    if list_:
        others = [f for f, v in (("DATASET", dataset), ("--from", from_path), ("--format", format), ("--out", out),
                                 ("--split", split), ("--revision", revision), ("--limit", limit), ("--skip-bad", skip_bad),
                                 ("--sample", sample)) if v]
        if others:
            raise ConfigError(f"--list only lists the datasets and downloads nothing, so {', '.join(others)} would be "
                              f"ignored; run `gradcouple download --list` alone, or drop --list.")
        _print_sources()
        return
    if revision is not None and (sample or from_path):
        raise ConfigError(f"--revision {revision}: picks the version downloaded from the Hub or GitHub, and "
                          f"{'--sample reads the bundled sample' if sample else '--from reads your file'}; drop --revision.")
    if sample and from_path:
        raise DataError("--sample and --from exclude each other: --sample reads the bundled sample, --from your file.")
    if dataset is None and from_path is None:
        raise DataError("name a dataset (e.g. `gradcouple download musique --sample`) or pass --from PATH; `gradcouple download --list` shows the datasets.")
    name = ds.resolve_source(dataset).name if dataset else None
    if out is None:
        out = Path("data") / (name or (Path(from_path).stem if from_path else "pieces"))  # type: ignore[arg-type]
    result = ds.download(name, out, from_path="sample" if sample else from_path, format=format, split=split,
                         revision=revision, limit=limit, skip_bad=skip_bad)
    _print_summary(result)
    typer.echo(str(result.pieces_path))


def _print_sources() -> None:
    table = Table(title="gradcouple download --list", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("Hub / location · splits (*default) with records · license", overflow="fold")
    for row in ds.list_sources():
        sizes = [x.strip() for x in row["size"].split("/")]
        splits = ", ".join(
            f"{s}{'*' if s == row['default_split'] else ''} {sizes[i] if len(sizes) == len(row['splits']) else ''}".strip()
            for i, s in enumerate(row["splits"])
        ) or "-"
        name = row["name"] + ("\n[dim](sample)[/]" if row["sample"] else "")
        hub = row["hub"] if not row["hub_file"] else f"{row['hub']}\n{row['hub_file']}"
        table.add_row(name, f"{hub}\n{splits}\n[dim]license: {row['license']}[/]")
    out = Console()
    out.print(table, highlight=False)
    aliases = "; ".join(f"{a} = {n}" for a, n in ds.ALIASES.items())
    out.print(f"aliases: {aliases}", highlight=False)
    out.print("(sample): `--sample` reads a bundled real sample (the first records of the source: 12, or 60 for "
              "rippleedits); sources and licenses in gradcouple/NOTICE.", highlight=False)


def _print_summary(result: ds.DownloadResult) -> None:
    m = result.meta
    inp = m.input
    where = inp.get("hub") or inp.get("hub_id") or inp.get("path")
    table = Table(title=f"gradcouple download: {m.dataset}", title_justify="left", show_header=False, box=box.SIMPLE, pad_edge=False)
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("input", f"{where}" + (f" \\[{m.split}]" if m.split else "") + f" ({inp['kind']})")
    table.add_row("records read", str(m.records_read))
    table.add_row("records used", str(m.records_used))
    for reason, n in m.records_skipped.items():
        table.add_row("  record skipped", f"{n}  {reason}", style="yellow")
    for kind, n in m.pieces_per_kind.items():
        table.add_row(f"pieces: {kind}", str(n))
    for role, n in m.pieces_per_role.items():
        table.add_row(f"benchmark pieces: {role}", str(n))
    for criterion, n in m.pieces_per_criterion.items():
        table.add_row(f"  tests: {criterion}", str(n))
    table.add_row("pieces written", str(m.pieces_made), style="green")
    for kind, n in m.pieces_merged_as_duplicates.items():
        table.add_row("  duplicates merged", f"{n}  {kind}")
    for reason, n in m.pieces_skipped.items():
        table.add_row("  piece skipped", f"{n}  {reason}", style="yellow")
    table.add_row("output", f"{result.pieces_path} (+ download.json)")
    console.print(table, highlight=False)
