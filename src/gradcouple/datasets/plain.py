"""A plain pieces file: a user's own facts, one knowledge piece per record.

Each record needs ``prompt`` and ``answer``; optional fields are ``id``, ``question_id``,
``hop``, ``kind`` (``cloze`` by default: the prompt is scored as written; ``single_hop`` or
``multi_hop`` ask it as a question, through the prompt template), ``aliases``,
``counterfactual``, ``support``, ``triple`` ({subject, relation, object} or a 3-item list),
``dataset``, ``owners`` and the benchmark fields ``role`` (edit, original, test, condition),
``edit_id``, ``criterion``, ``answer_before`` and ``condition_id``. A ``pieces.jsonl`` written
by ``gradcouple download`` is itself a valid plain pieces file and reads back unchanged. Without ``id`` a piece gets ``pieces:N:hop`` (N the 0-based record
number; hop ``q`` for ``multi_hop``, else the given hop or 0); without ``question_id`` the
record number is its question id.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..pieces import KnowledgePiece, PieceKind, PieceRole
from ._common import RecordContext, RecordError, clean, req_list, req_str, str_list

FORMAT = "pieces"
FIELDS = set(KnowledgePiece.model_fields)
#: Optional text fields of a benchmark piece, passed through as given.
BENCHMARK_TEXT = ("edit_id", "criterion", "answer_before", "condition_id")


def sniff(record: Mapping) -> bool:
    """True when ``record`` has a ``prompt`` and an ``answer`` and no dataset-specific field."""
    return "prompt" in record and "answer" in record and "requested_rewrite" not in record


def _triple(value: Any) -> tuple[str, str, str]:
    if isinstance(value, Mapping):
        parts = [value.get(k) for k in ("subject", "relation", "object")]
    else:
        parts = req_list(value, "triple")
    if len(parts) != 3 or not all(isinstance(p, str) and clean(p) for p in parts):
        raise RecordError("triple", "expected {subject, relation, object} with three non-empty strings", "malformed: triple")
    return parts[0], parts[1], parts[2]


def parse(record: Mapping, ctx: RecordContext) -> None:
    """Add the record's piece.

    Raises:
        RecordError: an unknown field, a missing or empty prompt/answer, or a malformed
            optional field.
    """
    unknown = sorted(set(record) - FIELDS)
    if unknown:
        raise RecordError(unknown[0], f"unknown field (allowed: {', '.join(sorted(FIELDS))})", "unknown field")
    prompt = req_str(record, "prompt")
    answer = req_str(record, "answer")
    kind_value = clean(record.get("kind") or "cloze")  # a plain prompt/answer pair is scored as written
    try:
        kind = PieceKind(kind_value)
    except ValueError:
        raise RecordError("kind", f"expected one of {', '.join(k.value for k in PieceKind)}, got {kind_value!r}", "unknown kind") from None
    hop = record.get("hop")
    if hop is not None and (isinstance(hop, bool) or not isinstance(hop, int) or hop < 0):
        raise RecordError("hop", f"expected a non-negative integer, got {hop!r}", "malformed: hop")
    if hop is None and kind != PieceKind.multi_hop:
        hop = 0
    ctx.record_id = str(ctx.index)
    qid = clean(record.get("question_id") or "") or str(ctx.index)
    piece_id = clean(record.get("id") or "") or None
    counterfactual = record.get("counterfactual")
    if counterfactual is not None and not isinstance(counterfactual, str):
        raise RecordError("counterfactual", "expected a string", "malformed: counterfactual")
    support = record.get("support")
    role = None
    if record.get("role") is not None:
        try:
            role = PieceRole(clean(record["role"]))
        except ValueError:
            raise RecordError("role", f"expected one of {', '.join(r.value for r in PieceRole)}, got {record['role']!r}", "unknown role") from None
    extra = {}
    for name in BENCHMARK_TEXT:
        if record.get(name) is not None:
            if not isinstance(record[name], str):
                raise RecordError(name, "expected a string", f"malformed: {name}")
            extra[name] = clean(record[name]) or None
    piece = ctx.add(hop, kind, prompt, answer, field="prompt/answer", piece_id=piece_id, question_id=qid,
                    aliases=str_list(record.get("aliases"), "aliases"),
                    support=support if isinstance(support, str) else None,
                    triple=_triple(record["triple"]) if record.get("triple") is not None else None,
                    counterfactual=counterfactual, role=role, **extra)
    if piece is not None:
        if record.get("dataset"):
            piece.dataset = req_str(record, "dataset")
        owners = str_list(record.get("owners"), "owners")
        piece.owners = [qid] + [o for o in owners if o != qid]
