"""Bamboogle (Press et al., Findings of EMNLP 2023): the question itself is the piece.

Reads FlashRAG records (``id``, ``question``, ``golden_answers`` = [answer, aliases...]) and the
Hub / sheet layout (``Question``, ``Answer``; no id, so the 0-based row number is the record
id). Reference: https://github.com/ofirpress/self-ask (``bamboogle`` sheet) and
https://huggingface.co/datasets/chiayewken/bamboogle.

Each record yields one multi-hop question piece (hop None, id ``bamboogle:ID:q``); Bamboogle
has no decomposition, so no single-hop pieces.
"""

from __future__ import annotations

from typing import Mapping

from ..pieces import PieceKind
from ._common import RecordContext, gold_answer, has, record_id, req_str

FORMAT = "bamboogle"


def sniff(record: Mapping) -> bool:
    """True for a bare question/answer record (no decomposition, context or evidence)."""
    q = "question" in record or "Question" in record
    a = "Answer" in record or "answer" in record or has(record, "golden_answers")
    rich = any(has(record, k) for k in ("question_decomposition", "supporting_facts", "evidences", "single_hops", "query"))
    return q and a and not rich and "prompt" not in record


def parse(record: Mapping, ctx: RecordContext) -> None:
    """Add the question's piece.

    Raises:
        RecordError: the question or the answer is missing or empty.
    """
    ctx.record_id = record_id(record, ("id", "_id"), ctx.index, required=False)
    question = req_str(record, "Question" if "Question" in record and "question" not in record else "question")
    answer, aliases, answer_field = gold_answer(record)
    ctx.add(None, PieceKind.multi_hop, question, answer, field=answer_field, aliases=aliases)
