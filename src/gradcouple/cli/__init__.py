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

from . import download as _download  # noqa: E402,F401  (each module registers its command)

for _name in ("extract", "couple", "ripple", "report", "run"):
    try:
        __import__(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # commands still being written
        if _e.name != f"{__name__}.{_name}":
            raise


def main() -> None:
    """Console-script entry point."""
    app()
