"""MQuAKE (Zhong et al., EMNLP 2023): single hops as cloze pieces, requested rewrites as their
counterfactuals and as benchmark edits, the multi-hop question as their test.

Reads the native records of MQuAKE-CF-3k, MQuAKE-CF-3k-v2, MQuAKE-CF, MQuAKE-T and
MQuAKE-hard (``case_id``, ``requested_rewrite`` = [{prompt, subject, target_true{str,id},
target_new{str,id}, relation_id, question}], ``questions``, ``answer``, ``answer_alias``,
``new_answer``, ``new_answer_alias``, ``single_hops`` = [{question, cloze, answer,
answer_alias}], ``new_single_hops``, ``orig`` = {triples, triples_labeled, new_triples,
new_triples_labeled, edit_triples}; MQuAKE-T adds ``answer_extended``). Reference:
https://github.com/princeton-nlp/MQuAKE (README, "Data format").

Per record:

- single hop k (hop k) is a cloze piece: its ``cloze`` as prompt, ``answer`` and
  ``answer_alias``, the labelled triple ``orig.triples_labeled[k]`` when present;
- each requested rewrite is matched to the hop it rewrites (``prompt.format(subject)`` equal to
  the hop's cloze and ``target_true`` to its answer, case-insensitively, or else the Wikidata
  triple (relation_id, target_true.id)); that hop's ``counterfactual`` is ``target_new``;
- a rewrite that matches no hop (MQuAKE-hard chains its edits, so later edits rewrite facts of
  the already-edited chain) becomes its own cloze piece, hop ``len(single_hops) + j`` for
  rewrite j: ``prompt.format(subject)`` -> ``target_true``, counterfactual ``target_new``;
- the first of ``questions`` is the multi-hop question piece, with ``new_answer`` as its
  counterfactual (the answer once every rewrite is applied).

Benchmark pieces (``role``, see :class:`~gradcouple.pieces.PieceRole`):

- requested rewrite j is an **edit** piece ``dataset:case:edit<j>``: its cloze ->
  ``target_new``, ``answer_before`` ``target_true``, triple (subject, relation, target_new),
  hop = the hop it rewrites (``len(single_hops) + j`` when unmatched);
- the hop it rewrites (or its own unmatched rewrite piece) is that edit's **original**
  (``edit_id``); hops no rewrite touches stay plain facts;
- ``dataset:case:test`` is the **test**: ``questions[0]`` -> ``new_answer`` (aliases
  ``new_answer_alias``), ``answer_before`` ``answer``, criterion ``multi_hop``, ``edit_id`` the
  case's first edit piece. A case's rewrites are applied together: all its edit pieces share
  the case's question id. The multi-hop question piece above stays a plain fact.

An edit piece whose cloze mentions ``target_new`` is skipped (counted); its hop then stays a
plain fact with a counterfactual, and the test links to the first edit piece made.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ..pieces import PieceKind, PieceRole
from ._common import (
    RecordContext,
    RecordError,
    clean,
    record_id,
    req_dict,
    req_list,
    req_str,
    str_list,
)

FORMAT = "mquake"
#: Criterion of the multi-hop test of a case.
CRITERION = "multi_hop"


def sniff(record: Mapping) -> bool:
    """True when ``record`` looks like an MQuAKE record."""
    return isinstance(record.get("requested_rewrite"), list) or "single_hops" in record


def _triples(orig: Optional[Mapping], key: str) -> list[Optional[list]]:
    if not isinstance(orig, Mapping) or not isinstance(orig.get(key), list):
        return []
    return [t if isinstance(t, list) and len(t) == 3 else None for t in orig[key]]


def _fold(s: str) -> str:
    return clean(s).casefold()


def parse(record: Mapping, ctx: RecordContext) -> None:
    """Add the edit pieces, the cloze pieces (with counterfactuals; originals of the edits),
    the multi-hop question piece and the case's test piece.

    Raises:
        RecordError: a required field is missing, empty or malformed.
    """
    ctx.record_id = record_id(record, ("case_id", "id"), ctx.index)
    questions = str_list(record.get("questions"), "questions") if "questions" in record else []
    if not questions:
        raise RecordError("questions", "missing" if "questions" not in record else "empty list",
                          "missing: questions" if "questions" not in record else "empty: questions")
    answer = req_str(record, "answer")
    aliases = str_list(record.get("answer_alias"), "answer_alias") + str_list(record.get("answer_extended"), "answer_extended")
    new_answer = clean(record.get("new_answer") or "") or None

    hops = [req_dict(h, f"single_hops[{k}]") for k, h in enumerate(req_list(record.get("single_hops"), "single_hops", allow_empty=False))]
    orig = record.get("orig") if isinstance(record.get("orig"), Mapping) else None
    labeled = _triples(orig, "triples_labeled")
    id_triples = _triples(orig, "triples")
    new_labeled = _triples(orig, "new_triples_labeled") + _triples(record.get("new"), "triples_labeled")

    clozes = [req_str(h, "cloze", f"single_hops[{k}]") for k, h in enumerate(hops)]
    answers = [req_str(h, "answer", f"single_hops[{k}]") for k, h in enumerate(hops)]
    counterfactual: dict[int, str] = {}
    rewrites: list[tuple[int, Optional[int], str, str, str, str, str]] = []  # j, hop or None, cloze, true, new, subject, relation
    for j, raw in enumerate(req_list(record.get("requested_rewrite"), "requested_rewrite")):
        path = f"requested_rewrite[{j}]"
        rw: Mapping[str, Any] = req_dict(raw, path)
        template = req_str(rw, "prompt", path)
        subject = req_str(rw, "subject", path)
        true = req_str(req_dict(rw.get("target_true"), f"{path}.target_true"), "str", f"{path}.target_true")
        new = req_str(req_dict(rw.get("target_new"), f"{path}.target_new"), "str", f"{path}.target_new")
        if "{}" not in template:
            raise RecordError(f"{path}.prompt", f"expected a '{{}}' placeholder for the subject, got {template!r}", "rewrite prompt without '{}'")
        cloze = clean(template.replace("{}", subject, 1))
        true_id = (rw.get("target_true") or {}).get("id")
        hit = next((k for k in range(len(hops)) if k not in counterfactual
                    and _fold(clozes[k]) == _fold(cloze) and _fold(answers[k]) == _fold(true)), None)
        if hit is None and true_id:
            hit = next((k for k, t in enumerate(id_triples) if t and k not in counterfactual and k < len(hops)
                        and t[1] == rw.get("relation_id") and t[2] == true_id
                        and k < len(labeled) and labeled[k] and _fold(str(labeled[k][0])) == _fold(subject)), None)
        if hit is not None:
            counterfactual[hit] = new
        t = labeled[hit] if hit is not None and hit < len(labeled) else None
        relation = (str(t[1]) if t and clean(t[1]) else
                    next((str(t[1]) for t in new_labeled if t and _fold(str(t[0])) == _fold(subject) and _fold(str(t[2])) == _fold(new)),
                         clean(rw.get("relation_id") or "") or "rewritten relation"))
        rewrites.append((j, hit, cloze, true, new, subject, relation))

    base = f"{ctx.dataset}:{ctx.record_id}"
    edit_of_hop: dict[int, str] = {}
    edit_of_rewrite: dict[int, str] = {}
    for j, hit, cloze, true, new, subject, relation in rewrites:
        piece = ctx.add(len(hops) + j if hit is None else hit, PieceKind.cloze, cloze, new, field=f"requested_rewrite[{j}]",
                        piece_id=f"{base}:edit{j}", triple=(subject, relation, new), role=PieceRole.edit, answer_before=true)
        if piece is not None:
            edit_of_rewrite[j] = piece.id
            if hit is not None:
                edit_of_hop[hit] = piece.id

    for k, hop in enumerate(hops):
        path = f"single_hops[{k}]"
        t = labeled[k] if k < len(labeled) else None
        ctx.add(k, PieceKind.cloze, clozes[k], answers[k], field=path,
                aliases=str_list(hop.get("answer_alias"), f"{path}.answer_alias"),
                triple=(str(t[0]), str(t[1]), str(t[2])) if t and all(clean(x) for x in t) else None,
                counterfactual=counterfactual.get(k),
                role=PieceRole.original if k in edit_of_hop else None, edit_id=edit_of_hop.get(k))
    for j, hit, cloze, true, new, subject, relation in rewrites:
        if hit is None:
            ctx.add(len(hops) + j, PieceKind.cloze, cloze, true, field=f"requested_rewrite[{j}]",
                    triple=(subject, relation, true), counterfactual=new,
                    role=PieceRole.original if j in edit_of_rewrite else None, edit_id=edit_of_rewrite.get(j))
    ctx.add(None, PieceKind.multi_hop, questions[0], answer, field="questions[0]", aliases=aliases,
            counterfactual=new_answer)
    if new_answer is not None and edit_of_rewrite:
        ctx.add(None, PieceKind.multi_hop, questions[0], new_answer, field="new_answer", piece_id=f"{base}:test",
                aliases=str_list(record.get("new_answer_alias"), "new_answer_alias"), answer_before=answer,
                role=PieceRole.test, criterion=CRITERION, edit_id=edit_of_rewrite[min(edit_of_rewrite)])
