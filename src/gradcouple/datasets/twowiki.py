"""2WikiMultiHopQA (Ho et al., COLING 2020): each evidence triple is a single-hop knowledge piece.

Reads native records (``_id``, ``type``, ``question``, ``context`` = [[title, [sentences]]],
``supporting_facts`` = [[title, sentence index]], ``evidences`` = [[subject, relation, object]],
``answer``, ``entity_ids``, ``evidences_id``, ``answer_id``), the Hugging Face layout (``context``
and ``supporting_facts`` as dicts of parallel lists, as for HotpotQA; ``evidences`` as a list of
triples, of {subject/fact, relation, object/entity} dicts, or a dict of parallel lists) and the
same fields under FlashRAG's ``metadata``. Reference: https://github.com/Alab-NII/2wikimultihop
(README, "Dataset format").

Evidence triple k (hop k) becomes the question "relation of subject?" from the
relation-template table, answered by the object, with the triple attached and, as support,
the supporting sentences of the subject's paragraph. The multi-hop question is a piece too.
"""

from __future__ import annotations

from typing import Mapping, Optional

from ..pieces import PieceKind
from . import hotpotqa
from ._common import (
    RecordContext,
    RecordError,
    entity_name,
    gold_answer,
    has,
    lookup,
    record_id,
    relation_question,
    req_dict,
    req_list,
    req_str,
)

FORMAT = "2wikimultihopqa"
_PARTS = ("subject", "relation", "object")


def sniff(record: Mapping) -> bool:
    """True when ``record`` looks like a 2WikiMultiHopQA record."""
    return has(record, "evidences")


def evidences(record: Mapping) -> list[tuple[str, str, str]]:
    """``evidences`` as [(subject, relation, object), ...] from any of the published layouts."""
    value, path = lookup(record, "evidences")
    if isinstance(value, Mapping) or (isinstance(value, str) and value.startswith("{")):
        value = req_dict(value, path)
        cols = [next((k for k in keys if k in value), None) for keys in (("subject", "fact"), ("relation",), ("object", "entity"))]
        if None in cols:
            raise RecordError(path, "expected lists 'subject', 'relation', 'object'")
        lists = [req_list(value[c], f"{path}.{c}") for c in cols]  # type: ignore[index]
        rows = list(zip(*lists))
    else:
        rows = []
        for i, item in enumerate(req_list(value, path)):
            if isinstance(item, Mapping):
                item = [item.get("subject", item.get("fact")), item.get("relation"), item.get("object", item.get("entity"))]
            rows.append(tuple(req_list(item, f"{path}[{i}]")))
    out = []
    for i, row in enumerate(rows):
        if len(row) != 3:
            raise RecordError(f"{path}[{i}]", f"expected [subject, relation, object], got {len(row)} item(s)", "evidence is not a triple")
        out.append(tuple(req_str(dict(zip(_PARTS, row)), part, f"{path}[{i}]") for part in _PARTS))
    return out


def _support_by_subject(record: Mapping) -> dict[str, str]:
    if not (has(record, "context") and has(record, "supporting_facts")):
        return {}
    context = hotpotqa.paragraphs(record)
    by_title: dict[str, list[str]] = {}
    for title, idx in hotpotqa.supporting_facts(record):
        if title in context and 0 <= idx < len(context[title]):
            by_title.setdefault(title, []).append(context[title][idx].strip())
    out: dict[str, str] = {}
    for title, sents in by_title.items():
        for key in {title.casefold(), entity_name(title).casefold()}:
            out.setdefault(key, " ".join(sents))
    return out


def _find_support(subject: str, support: dict[str, str]) -> Optional[str]:
    return support.get(subject.casefold()) or support.get(entity_name(subject).casefold())


def parse(record: Mapping, ctx: RecordContext) -> None:
    """Add one piece per evidence triple and the multi-hop question piece.

    Raises:
        RecordError: a required field is missing, empty or malformed.
    """
    ctx.record_id = record_id(record, ("_id", "id"), ctx.index)
    question = req_str(record, "question")
    answer, aliases, answer_field = gold_answer(record)
    triples = evidences(record)
    support = _support_by_subject(record)
    for k, (s, r, o) in enumerate(triples):
        ctx.add(k, PieceKind.single_hop, relation_question(s, r), o, field=f"evidences[{k}]",
                support=_find_support(s, support), triple=(s, r, o))
    ctx.add(None, PieceKind.multi_hop, question, answer, field=answer_field, aliases=aliases)
