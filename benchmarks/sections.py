"""Marked sections of docs/performance.md that one benchmark owns and the others keep.

A section is the text between ``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->``;
:func:`put` replaces (or appends) one, :func:`carried` returns every section of a file so a
benchmark that rewrites the whole file can append them unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

_SECTION = re.compile(r"<!-- bench:(?P<name>[\w-]+):begin -->\n.*?<!-- bench:(?P=name):end -->\n?", re.S)


def block(name: str, text: str) -> str:
    return f"<!-- bench:{name}:begin -->\n{text.rstrip()}\n<!-- bench:{name}:end -->\n"


def put(path: Path, name: str, text: str) -> None:
    """Replace section ``name`` of ``path`` by ``text`` (append it when absent)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    new, n = re.subn(rf"<!-- bench:{name}:begin -->\n.*?<!-- bench:{name}:end -->\n?", lambda _: block(name, text), old, flags=re.S)
    if not n:
        new = old.rstrip("\n") + "\n\n" + block(name, text)
    path.write_text(new, encoding="utf-8")


def carried(path: Path) -> str:
    """Every marked section of ``path``, concatenated (empty when none or no file)."""
    if not path.is_file():
        return ""
    return "\n".join(m.group(0) for m in _SECTION.finditer(path.read_text(encoding="utf-8")))
