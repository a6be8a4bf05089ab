"""Reading a typed artifact back: one line naming the file, the field and the fix when it does not load."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import ArtifactError

M = TypeVar("M", bound=BaseModel)


def read_model(path: Path, model: type[M], fix: str) -> M:
    """``model`` validated from the JSON file ``path``.

    Raises:
        ArtifactError: unreadable, not JSON, or a field missing or invalid; the message names the
            file and the field, then ``fix``.
    """
    try:
        return model.model_validate_json(path.read_bytes())
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror}); {fix}") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "<document>"
        raise ArtifactError(f"{path}: field '{loc}': {err['msg']}; {fix}") from None


def read_lines(path: Path, model: type[M], fix: str) -> list[M]:
    """``model`` validated from each non-blank line of the JSON-lines file ``path`` ([] when absent).

    Raises:
        ArtifactError: a line that is not a valid ``model``; the message names the file and line, then ``fix``.
    """
    rows = []
    if path.is_file():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(model.model_validate_json(line))
                except ValidationError as e:
                    raise ArtifactError(f"{path}:{n}: {e.errors()[0]['msg']}; {fix}") from None
    return rows


__all__ = ["read_lines", "read_model"]
