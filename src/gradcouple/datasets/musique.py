"""MuSiQue (Trivedi et al., TACL 2022): each decomposition step is a single-hop knowledge piece.

Reads the native ``musique_ans_v1.0_*.jsonl`` / ``musique_full_v1.0_*.jsonl`` records (``id``,
``paragraphs`` = [{idx, title, paragraph_text, is_supporting}], ``question``,
``question_decomposition`` = [{id, question, answer, paragraph_support_idx}], ``answer``,
``answer_aliases``, ``answerable``) and FlashRAG records (``id``, ``question``,
``golden_answers``, ``metadata.answerable``, ``metadata.question_decomposition`` whose steps carry
their ``support_paragraph``). Reference: https://github.com/StonyBrookNLP/musique (README,
"Data format").

Per answerable record, step k (0-based hop k) becomes a piece:

- "#j" in a step is replaced by step j's answer (1-based, as in the data);
- an "X >> relation" step becomes a natural question from the relation-template table
  (:data:`gradcouple.datasets.RELATION_TEMPLATES`) and carries the triple
  (X, relation, answer); other steps are kept as written;
- the supporting paragraph's text is the piece's support.

The multi-hop question is a piece too. Unanswerable records (``answerable: false``, in
MuSiQue-Full) yield no pieces and are counted as skipped records.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from ..pieces import PieceKind
from ._common import (
    RecordContext,
    RecordError,
    SkipRecord,
    clean,
    gold_answer,
    has,
    lookup,
    record_id,
    relation_question,
    req_dict,
    req_list,
    req_str,
)

FORMAT = "musique"
UNANSWERABLE = "unanswerable (answerable: false)"
_REF = re.compile(r"#(\d+)")


def sniff(record: Mapping) -> bool:
    """True when ``record`` looks like a MuSiQue record (native or FlashRAG)."""
    return has(record, "question_decomposition")


def _answerable(record: Mapping) -> bool:
    if not has(record, "answerable"):
        return True
    value, path = lookup(record, "answerable")
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise RecordError(path, f"expected true or false, got {value!r}")
    return value


def _support(record: Mapping, step: Mapping, path: str) -> Optional[str]:
    sp = step.get("support_paragraph")
    if isinstance(sp, Mapping) and sp.get("paragraph_text"):
        return str(sp["paragraph_text"])
    idx = step.get("paragraph_support_idx")
    paras = record.get("paragraphs")
    if isinstance(idx, int) and not isinstance(idx, bool) and isinstance(paras, list):
        for i, p in enumerate(paras):
            if isinstance(p, Mapping) and p.get("idx", i) == idx and p.get("paragraph_text"):
                return str(p["paragraph_text"])
    return None


def paragraph_texts(record: Mapping) -> list[str]:
    """The text of every paragraph of the record (supporting or not), in record order."""
    return [str(p.get("paragraph_text", "")) for p in record.get("paragraphs", []) if isinstance(p, Mapping)]


def resolve_refs(text: str, answers: list[str], path: str) -> str:
    """Replace each "#k" in ``text`` by ``answers[k-1]`` (the answers of earlier steps).

    Raises:
        RecordError: "#k" points at this step or a later one.
    """

    def sub(m: re.Match) -> str:
        k = int(m.group(1))
        if not 1 <= k <= len(answers):
            raise RecordError(path, f"refers to #{k}, but only {len(answers)} earlier step(s) exist", "reference to a step that does not precede it")
        return answers[k - 1]

    return _REF.sub(sub, text)


def step_prompt(question: str, answers: list[str], path: str) -> tuple[str, Optional[tuple[str, str]]]:
    """The natural prompt of one decomposition step and, for "X >> relation" steps, (X, relation)."""
    if ">>" in question:
        subject, _, relation = question.partition(">>")
        subject = clean(resolve_refs(subject, answers, path))
        relation = clean(relation)
        if not subject or not relation or ">>" in relation:
            raise RecordError(path, f"malformed 'X >> relation' step {question!r}", "malformed 'X >> relation' step")
        return relation_question(subject, relation), (subject, relation)
    text = clean(resolve_refs(question, answers, path))
    # "#1 ?" in the source leaves a space before the mark once #1 is replaced.
    return re.sub(r"\s+([?.!,])", r"\1", text), None


def parse(record: Mapping, ctx: RecordContext) -> None:
    """Add one piece per decomposition step and the multi-hop question piece.

    Raises:
        RecordError: a required field is missing, empty or malformed, or a "#k" reference
            points forward.
        SkipRecord: the record is unanswerable.
    """
    ctx.record_id = record_id(record, ("id", "_id"), ctx.index)
    question = req_str(record, "question")
    if not _answerable(record):
        raise SkipRecord(UNANSWERABLE)
    answer, aliases, answer_field = gold_answer(record)
    value, dpath = lookup(record, "question_decomposition")
    steps = req_list(value, dpath, allow_empty=False)
    answers: list[str] = []
    for k, raw in enumerate(steps):
        path = f"{dpath}[{k}]"
        step: Mapping[str, Any] = req_dict(raw, path)
        step_q = req_str(step, "question", path)
        step_a = req_str(step, "answer", path)
        prompt, sr = step_prompt(step_q, answers, f"{path}.question")
        answers.append(step_a)
        ctx.add(k, PieceKind.single_hop, prompt, step_a, field=path,
                support=_support(record, step, path), triple=(sr[0], sr[1], step_a) if sr else None)
    ctx.add(None, PieceKind.multi_hop, question, answer, field=answer_field, aliases=aliases)
