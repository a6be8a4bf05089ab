"""The ``gradcouple`` command line: thin Typer commands over the library (see :mod:`.app`)."""

from .app import app, main

__all__ = ["app", "main"]
