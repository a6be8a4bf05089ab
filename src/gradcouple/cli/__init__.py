"""The ``gradcouple`` command line: thin Typer commands over the library."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="gradcouple",
    help="Gradient coupling of knowledge pieces in causal LMs, and the ripple effects of editing them.\n\n"
    "Stages: download -> extract -> couple -> ripple -> report, or all at once with `run`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

from . import couple, download, extract, report, ripple, run  # noqa: E402,F401  (each registers its command)


def main() -> None:
    """Console-script entry point."""
    app()
