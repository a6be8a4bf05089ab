"""RippleEdits (Cohen et al., TACL 2024): one knowledge edit per record, as pieces that carry it.

Reads two record layouts:

- **native** benchmark entries (``data/benchmark/{popular,random,recent}.json`` of
  edenbiran/RippleEdits): ``edit`` = {prompt, subject_id, relation, target_id,
  ``previous_fact`` (absent for RECENT; ``original_fact`` accepted) = {prompt, subject_id,
  relation, target_id}} and six criteria ``Logical_Generalization``, ``Compositionality_I``,
  ``Compositionality_II``, ``Subject_Aliasing``, ``Relation_Specifity`` (the README's spelling;
  the benchmark's loader writes ``Relation_Specificity``, also read) and ``Forgetfulness``, each
  a list of tests {test_queries, test_condition ("OR"/"AND"), condition_queries}; a query is
  {prompt, answers: [{value, aliases}], query_type ("regular"/"two_hop"), subject_id, relation,
  target_ids, phrase (null, or the prompt when it is not the relation's template), and for
  two-hop queries second_relation, second_hop_target_ids (which the answers name)}. Ids are
  Wikidata ids;
- **restructured** Compositionality-I records (Qin et al., EMNLP 2024): ``edit`` as above with
  names in place of ids (``original_fact`` for the true fact) and ``compositional_I_problems``
  = [{compositional_query: {prompt, answer, subject, target, relation}, condition_query:
  {prompt, answer, subject, target, relation}}], read as criterion ``Compositionality_I``.

Per record (ids ``dataset:record:part``; the record id is its ``id`` field, else its 0-based
position; every piece's question id is the record id, so one edit's pieces are same-question),
all cloze pieces:

- ``edit`` (part ``edit``, hop 0): the edit prompt without its trailing new target and final
  period -> the NEW target, ``answer_before`` the true target, triple (subject, relation, new
  target). The target names: a name the answers give for the target id (native), or the id
  itself when it is a name (restructured), else the tail of the edit prompt after the words it
  shares with the previous fact's prompt. The subject: its name where the answers give one for
  its id (native, e.g. a Compositionality_II condition) or the id itself when it is a name,
  else its Wikidata id;
- ``original`` (part ``original``, hop 0): the same prompt -> the true target, ``edit_id`` the
  edit piece, ``counterfactual`` the new target; none when there is no previous fact (RECENT);
- ``condition`` (part ``Criterion.i.condk``, hop 1) per condition query k of test i: prompt ->
  first answer value (the other values and aliases as aliases), ``edit_id``;
- ``test`` (part ``Criterion.i.testk``, hop 2) per test query k of test i: prompt -> first
  answer value (aliases likewise), ``criterion``, ``edit_id``, and ``condition_id`` = the first
  condition piece of its test. ``test_condition`` (how a test's queries combine) is not kept.

Hops only order an edit's pieces: 0 the edit and its original, 1 conditions, 2 tests.

A record whose edit prompt mentions the new target is skipped (no edit to test); other pieces
that leak their answer are skipped and counted as for every format, and so are queries without
any answer (the benchmark lists, e.g., an aunt test for a person with no aunts).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from ..pieces import PieceKind, PieceRole
from ._common import (
    RecordContext,
    RecordError,
    SkipRecord,
    clean,
    leaks,
    mention_pattern,
    normalize_relation,
    record_id,
    req_dict,
    req_list,
    req_str,
    str_list,
)

FORMAT = "rippleedits"
#: The six criteria of the native format, in the benchmark's order. ``Relation_Specifity`` is
#: the spelling of the README's example; :data:`CRITERION_SPELLINGS` maps the loader's to it.
CRITERIA = ("Relation_Specifity", "Logical_Generalization", "Subject_Aliasing", "Compositionality_I",
            "Compositionality_II", "Forgetfulness")
CRITERION_SPELLINGS = {c: c for c in CRITERIA} | {"Relation_Specificity": "Relation_Specifity"}
#: Key of the restructured Compositionality-I problems, and the criterion they are tests of.
PROBLEMS = "compositional_I_problems"
NO_ANSWERS = "query with no answers"
EDIT_LEAK = "edit prompt mentions its new target"

_QID = re.compile(r"Q\d+")


def sniff(record: Mapping) -> bool:
    """True when ``record`` looks like a RippleEdits entry (native or restructured)."""
    return "edit" in record and (PROBLEMS in record or any(k in record for k in CRITERION_SPELLINGS))


class _Names:
    """Entity id -> (name, aliases), from the answers of every query of a native record."""

    def __init__(self) -> None:
        self.by_id: dict[str, tuple[str, list[str]]] = {}

    def learn(self, query: Mapping) -> None:
        answers = query.get("answers")
        ids = query.get("second_hop_target_ids") if query.get("query_type") == "two_hop" else query.get("target_ids")
        if not isinstance(answers, list) or not isinstance(ids, list) or len(ids) != len(answers):
            return
        for tid, ans in zip(ids, answers):
            if isinstance(ans, Mapping) and isinstance(ans.get("value"), (str, int, float)) and clean(ans["value"]):
                aliases = [clean(a) for a in ans.get("aliases") or [] if isinstance(a, (str, int, float)) and clean(a)]
                self.by_id.setdefault(clean(tid), (clean(ans["value"]), aliases))

    def name(self, entity_id: str) -> Optional[str]:
        """The entity's name: from the answers, or the id itself unless it is a Wikidata id."""
        if entity_id in self.by_id:
            return self.by_id[entity_id][0]
        return None if _QID.fullmatch(entity_id) else entity_id

    def aliases(self, entity_id: str, name: str) -> list[str]:
        known = self.by_id.get(entity_id)
        return known[1] if known and known[0].casefold() == name.casefold() else []


def _body(prompt: str) -> str:
    """A fact sentence without its final period."""
    return prompt[:-1].rstrip() if prompt.endswith(".") else prompt


def _before(body: str, name: Optional[str]) -> Optional[str]:
    """``body`` without its trailing `` name`` (case-insensitive), or None when it does not end so."""
    if name and len(body) > len(name) and body[-len(name):].casefold() == name.casefold() and body[-len(name) - 1] == " ":
        return body[: -len(name) - 1].rstrip() or None
    return None


def _split_edit(edit_body: str, new_name: Optional[str], prev_body: Optional[str], true_name: Optional[str]) -> tuple[str, str, Optional[str]]:
    """(cloze prefix, new target, true target) of an edit sentence and its previous fact's.

    Raises:
        RecordError: neither a known name nor the previous fact tells where the target begins.
    """
    prefix = _before(edit_body, new_name)
    if prefix is None and prev_body is not None:
        shared = _before(prev_body, true_name)
        if shared is not None and edit_body.startswith(shared + " "):
            prefix = shared
        else:
            ew, pw = edit_body.split(), prev_body.split()
            k = 0
            while k < min(len(ew), len(pw)) and ew[k] == pw[k]:
                k += 1
            if 0 < k < min(len(ew), len(pw)):
                prefix = " ".join(ew[:k])
        if prefix is not None:
            new_name = edit_body[len(prefix):].strip()
    if prefix is None or not new_name:
        raise RecordError("edit.prompt", "cannot tell where the new target begins: no answer names edit.target_id, "
                          "and no previous fact prompt shares its beginning", "edit target not found in edit.prompt")
    if prev_body is not None and _before(prev_body, true_name) != prefix and prev_body.startswith(prefix + " "):
        true_name = prev_body[len(prefix):].strip()
    return prefix, new_name, true_name if prev_body is not None else None


def _answers(query: Mapping, path: str, restructured: bool) -> list[str]:
    """The query's answer followed by its aliases and other answers (empty: no answer)."""
    if restructured:
        return [req_str(query, "answer", path)]
    out: list[str] = []
    for j, raw in enumerate(req_list(query.get("answers"), f"{path}.answers")):
        ans = req_dict(raw, f"{path}.answers[{j}]")
        out.append(req_str(ans, "value", f"{path}.answers[{j}]"))
        out.extend(str_list(ans.get("aliases"), f"{path}.answers[{j}].aliases"))
    return out


def _tests(record: Mapping) -> list[tuple[str, str, list[Any], list[Any]]]:
    """(criterion, path, test queries, condition queries) of every test, in record order."""
    if PROBLEMS in record:
        out = []
        for i, raw in enumerate(req_list(record[PROBLEMS], PROBLEMS)):
            path = f"{PROBLEMS}[{i}]"
            problem = req_dict(raw, path)
            test = req_dict(problem.get("compositional_query"), f"{path}.compositional_query")
            cond = problem.get("condition_query")
            out.append(("Compositionality_I", path, [(test, f"{path}.compositional_query")],
                        [] if cond is None else [(req_dict(cond, f"{path}.condition_query"), f"{path}.condition_query")]))
        return out
    out = []
    for key in record:
        criterion = CRITERION_SPELLINGS.get(key)
        if criterion is None:
            continue
        for i, raw in enumerate(req_list(record[key], key)):
            path = f"{key}[{i}]"
            test = req_dict(raw, path)
            queries = [(req_dict(q, f"{path}.test_queries[{k}]"), f"{path}.test_queries[{k}]")
                       for k, q in enumerate(req_list(test.get("test_queries"), f"{path}.test_queries"))]
            conditions = [(req_dict(q, f"{path}.condition_queries[{k}]"), f"{path}.condition_queries[{k}]")
                          for k, q in enumerate(req_list(test.get("condition_queries") or [], f"{path}.condition_queries"))]
            out.append((criterion, path, queries, conditions))
    return out


def _criterion_counter(tests: list[tuple[str, str, list, list]]) -> list[int]:
    """Index of each test within its criterion."""
    seen: dict[str, int] = {}
    out = []
    for criterion, *_ in tests:
        out.append(seen.get(criterion, 0))
        seen[criterion] = out[-1] + 1
    return out


def parse(record: Mapping, ctx: RecordContext) -> None:
    """Add the edit, original, condition and test pieces of one RippleEdits record.

    Raises:
        RecordError: a required field is missing, empty or malformed, or the edit prompt does
            not show where its new target begins.
        SkipRecord: the edit prompt mentions its own new target.
    """
    ctx.record_id = record_id(record, ("id",), ctx.index, required=False)
    restructured = PROBLEMS in record
    edit = req_dict(record.get("edit"), "edit")
    prev_key = next((k for k in ("previous_fact", "original_fact") if edit.get(k) is not None), None)
    prev = req_dict(edit[prev_key], f"edit.{prev_key}") if prev_key else None
    tests = _tests(record)

    names = _Names()
    if not restructured:
        for _, _, queries, conditions in tests:
            for query, _ in queries + conditions:
                names.learn(query)
    subject_id = req_str(edit, "subject_id", "edit")
    target_id = req_str(edit, "target_id", "edit")
    relation = normalize_relation(req_str(edit, "relation", "edit"))
    prev_target = req_str(prev, "target_id", f"edit.{prev_key}") if prev else None
    prefix, new, true = _split_edit(
        _body(req_str(edit, "prompt", "edit")), names.name(target_id),
        _body(req_str(prev, "prompt", f"edit.{prev_key}")) if prev else None,
        names.name(prev_target) if prev_target else None)
    subject = names.name(subject_id)
    if subject is None or not mention_pattern(subject).search(prefix):
        subject = subject_id
    if leaks(prefix, new):
        raise SkipRecord(EDIT_LEAK)

    base = f"{ctx.dataset}:{ctx.record_id}"
    edit_piece = ctx.add(0, PieceKind.cloze, prefix, new, field="edit.prompt", piece_id=f"{base}:edit",
                         aliases=names.aliases(target_id, new), triple=(subject, relation, new),
                         role=PieceRole.edit, answer_before=true)
    assert edit_piece is not None  # the leak was ruled out above
    if true is not None:
        ctx.add(0, PieceKind.cloze, prefix, true, field=f"edit.{prev_key}.prompt", piece_id=f"{base}:original",
                aliases=names.aliases(prev_target or "", true), triple=(subject, relation, true),
                counterfactual=new, role=PieceRole.original, edit_id=edit_piece.id)

    for (criterion, _, queries, conditions), i in zip(tests, _criterion_counter(tests)):
        condition_id = None
        for k, (query, qpath) in enumerate(conditions):
            answers = _answers(query, qpath, restructured)
            if not answers:
                ctx.skip(NO_ANSWERS)
                continue
            subj = clean(query.get("subject") or "") if restructured else names.name(clean(query.get("subject_id") or ""))
            rel = clean(query.get("relation") or "")
            piece = ctx.add(1, PieceKind.cloze, req_str(query, "prompt", qpath), answers[0], field=qpath,
                            aliases=answers[1:], piece_id=f"{base}:{criterion}.{i}.cond{k}",
                            triple=(subj, normalize_relation(rel), answers[0]) if subj and rel else None,
                            role=PieceRole.condition, edit_id=edit_piece.id)
            if piece is not None and condition_id is None:
                condition_id = piece.id
        for k, (query, qpath) in enumerate(queries):
            answers = _answers(query, qpath, restructured)
            if not answers:
                ctx.skip(NO_ANSWERS)
                continue
            ctx.add(2, PieceKind.cloze, req_str(query, "prompt", qpath), answers[0], field=qpath,
                    aliases=answers[1:], piece_id=f"{base}:{criterion}.{i}.test{k}",
                    role=PieceRole.test, criterion=criterion, edit_id=edit_piece.id, condition_id=condition_id)
