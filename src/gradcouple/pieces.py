"""Knowledge pieces: the facts behind a multi-hop question, one pydantic record per JSONL line."""

from __future__ import annotations

import codecs
import json
import os
from enum import Enum
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import DataError
from .io import atomic_open
from .rules import answer_continuation

DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


class PieceKind(str, Enum):
    """How a piece's prompt reads: a single-hop question, a cloze prefix, or the whole multi-hop question."""

    single_hop = "single_hop"
    cloze = "cloze"
    multi_hop = "multi_hop"


class PieceRole(str, Enum):
    """A piece's part in a knowledge-edit benchmark (None on a piece means a plain fact).

    ``edit``: the edited fact with its NEW target as answer (its gradient is the direction the
    edit moves); ``original``: the same prompt with the true target (the fact before the edit);
    ``test``: a test query of an edit, answered as expected after the edit; ``condition``: the
    fact a test presupposes, checked on the unedited model.
    """

    edit = "edit"
    original = "original"
    test = "test"
    condition = "condition"


class Triple(BaseModel):
    """A (subject, relation, object) fact."""

    model_config = ConfigDict(extra="forbid")
    subject: str
    relation: str
    object: str


class KnowledgePiece(BaseModel):
    """One knowledge piece: a prompt whose answer the model is scored on.

    ``id`` is stable across runs: ``dataset:record:hop`` (``hop`` is ``q`` for the whole
    multi-hop question). ``prompt`` is the question text for question kinds (rendered with the
    config's ``prompt_template`` at scoring time) and the verbatim prefix for cloze pieces.
    ``owners`` lists every multi-hop question id that yielded an identical (prompt, answer)
    piece after deduplication; ``question_id`` is the first of them.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Stable id dataset:record:hop")
    dataset: str = Field(description="Source dataset name, e.g. 'musique'")
    question_id: str = Field(description="Id of the multi-hop question this piece belongs to")
    hop: Optional[int] = Field(default=None, description="0-based hop index; None for the multi-hop question")
    kind: PieceKind
    prompt: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    support: Optional[str] = Field(default=None, description="Supporting text the fact comes from")
    triple: Optional[Triple] = None
    counterfactual: Optional[str] = Field(default=None, description="Answer an edit rewrites this piece to")
    owners: list[str] = Field(default_factory=list, description="All question ids sharing this piece")
    role: Optional[PieceRole] = Field(default=None, description="Part in an edit benchmark; None = a plain fact")
    edit_id: Optional[str] = Field(default=None, description="For original/test/condition pieces: the id of their edit piece")
    criterion: Optional[str] = Field(default=None, description="For tests: the benchmark's criterion, e.g. Compositionality_I")
    answer_before: Optional[str] = Field(default=None, description="For edits and tests: the answer before the edit, where known")
    condition_id: Optional[str] = Field(default=None, description="For tests: the id of the condition piece it presupposes")

    @field_validator("prompt", "answer")
    @classmethod
    def _strip_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    def render(self, template: str = DEFAULT_PROMPT_TEMPLATE) -> tuple[str, str]:
        """Return the exact (prompt, answer) strings that are scored.

        Question kinds go through ``template`` (which must contain ``{question}``); cloze
        prefixes are used as is; the answer follows the leading-space rule
        (:func:`gradcouple.rules.answer_continuation`).
        """
        prompt = self.prompt if self.kind == PieceKind.cloze else template.format(question=self.prompt)
        return prompt, answer_continuation(prompt, self.answer)

    def render_answer(self, answer: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> tuple[str, str]:
        """As :meth:`render`, with another answer (an edit's new target) in place of the piece's own."""
        return self.model_copy(update={"answer": answer}).render(template)

    @property
    def question_ids(self) -> set[str]:
        """The multi-hop questions this piece belongs to: its owners (the same-question rule's input)."""
        return set(self.owners or [self.question_id])


def write_pieces(path: str | os.PathLike, pieces: Iterable[KnowledgePiece]) -> int:
    """Atomically write pieces as JSONL; return how many were written."""
    n = 0
    with atomic_open(path, "w", encoding="utf-8") as fh:
        for p in pieces:
            fh.write(p.model_dump_json(exclude_none=True) + "\n")
            n += 1
    return n


def not_utf8(err: UnicodeDecodeError, data: bytes, *, offset: int = 0, lineno: Optional[int] = None) -> str:
    """Where and why ``data`` (found at byte ``offset`` of its file) is not UTF-8, for messages:
    ``not UTF-8 at byte 1234 (line 7: byte 0xe9, invalid continuation byte)``.

    ``lineno`` is the line ``data`` starts on; without it, lines are counted in ``data``.
    """
    line = (lineno or 1) + data.count(b"\n", 0, err.start)
    bad = " ".join(f"0x{b:02x}" for b in data[err.start:err.end])
    return f"not UTF-8 at byte {offset + err.start} (line {line}: byte {bad}, {err.reason})"


def is_utf16(path: str | os.PathLike) -> bool:
    """Whether the file starts with a UTF-16 byte-order mark (then no line of it is UTF-8)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    except OSError:
        return False


def reencode_hint(path: str | os.PathLike) -> str:
    """How to fix a text file that is not UTF-8: the ``iconv`` call that re-encodes it (from
    UTF-16 when it starts with a UTF-16 byte-order mark, else from Latin-1, the usual culprit)."""
    if is_utf16(path):
        return "re-encode it as UTF-8 (e.g. iconv -f utf-16 -t utf-8)"
    return "re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"


def utf8_lines(fh: BinaryIO) -> Iterator[tuple[int, Optional[str], Optional[str]]]:
    """The lines of a file opened in binary mode: ``(line number, text, None)``, or
    ``(line number, None, problem)`` for a line that is not UTF-8 (``problem`` from
    :func:`not_utf8`, with the byte offset in the file). A leading UTF-8 byte-order mark is dropped.
    """
    offset = 0
    for lineno, raw in enumerate(fh, 1):
        start = len(codecs.BOM_UTF8) if lineno == 1 and raw.startswith(codecs.BOM_UTF8) else 0
        try:
            text, problem = raw[start:].decode("utf-8"), None
        except UnicodeDecodeError as e:
            text, problem = None, not_utf8(e, raw[start:], offset=offset + start, lineno=lineno)
        yield lineno, text, problem
        offset += len(raw)


def read_pieces(path: str | os.PathLike) -> list[KnowledgePiece]:
    """Read a pieces JSONL file.

    Raises:
        DataError: the file is missing or empty, a line is not UTF-8 (the message names the
            byte offset and line), a line is not JSON, or a field is invalid; the message names
            the file, the line and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such pieces file; make one with `gradcouple download DATASET --out DIR`.")
    pieces: list[KnowledgePiece] = []
    seen: set[str] = set()
    with open(path, "rb") as fh:
        for lineno, line, problem in utf8_lines(fh):
            if problem is not None:
                raise DataError(f"{path}: {problem}; {reencode_hint(path)}.")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}; column {e.colno}).") from None
            try:
                piece = KnowledgePiece.model_validate(obj)
            except ValidationError as e:
                err = e.errors()[0]
                field = ".".join(str(x) for x in err["loc"]) or "<record>"
                hint = ""
                if isinstance(obj, dict) and {"prompt", "answer"} <= set(obj) and err["type"] == "missing":
                    hint = (f" This looks like a hand-written file of facts (prompt, answer, ...): convert it into a "
                            f"pieces file with `gradcouple download pieces --from {path} --out DIR`, which fills in "
                            f"the missing fields.")
                raise DataError(f"{path}:{lineno}: field '{field}': {err['msg']}.{hint}") from None
            if piece.id in seen:
                raise DataError(f"{path}:{lineno}: field 'id': duplicate piece id {piece.id!r}.")
            seen.add(piece.id)
            pieces.append(piece)
    if not pieces:
        raise DataError(f"{path}: contains no pieces.")
    return pieces
