"""WikiHop (QAngaroo; Welbl et al., TACL 2018): the "relation subject" query becomes a question.

Reads the native records (``id``, ``query`` = "relation subject" with the Wikidata relation's
words joined by underscores, e.g. "country sms braunschweig" or
"place_of_birth gregorio di cecco", ``answer``, ``candidates``, ``supports``, dev-set
``annotations``), as in ``qangaroo_v1.1/wikihop/{train,dev}.json`` and the Hub's ``qangaroo``
(config ``wikihop``). Reference: https://qangaroo.cs.ucl.ac.uk (README of the release).

Each record yields one piece: the multi-hop question (hop None, id ``wikihop:ID:q``), its
prompt the relation-template question about the subject, with the triple
(subject, relation, answer). Answering it takes several hops through ``supports``, but the
query itself names a single fact, so no separate single-hop piece is made. Text is kept
lower-cased, as released.
"""

from __future__ import annotations

from typing import Mapping

from ..pieces import PieceKind
from ._common import RecordContext, RecordError, clean, gold_answer, record_id, relation_question, req_str

FORMAT = "wikihop"


def sniff(record: Mapping) -> bool:
    """True when ``record`` looks like a WikiHop record."""
    return "query" in record and ("supports" in record or "candidates" in record)


def split_query(query: str) -> tuple[str, str]:
    """"relation subject" -> (relation with spaces, subject).

    Raises:
        RecordError: the query has no subject after the relation.
    """
    relation, _, subject = clean(query).partition(" ")
    if not subject.strip():
        raise RecordError("query", f"expected 'relation subject', got {query!r}", "query without a subject")
    return relation.replace("_", " "), clean(subject)


def parse(record: Mapping, ctx: RecordContext) -> None:
    """Add the query's piece.

    Raises:
        RecordError: ``id``, ``query`` or ``answer`` is missing or empty, or the query has no
            subject.
    """
    ctx.record_id = record_id(record, ("id",), ctx.index)
    relation, subject = split_query(req_str(record, "query"))
    answer, aliases, answer_field = gold_answer(record)
    ctx.add(None, PieceKind.multi_hop, relation_question(subject, relation), answer, field=answer_field,
            aliases=aliases, triple=(subject, relation, answer))
