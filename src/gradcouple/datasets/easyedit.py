"""EasyEdit / KnowEdit edit requests (Zhang et al. 2024, "A Comprehensive Study of Knowledge Editing
for Large Language Models"; zjunlp/EasyEdit, ``examples/KnowEdit.md`` and
``easyeditor/dataset/knowedit.py``): one edit per record, with the queries EasyEdit evaluates it on.

A record (one element of the JSON array) has ``subject``, ``prompt``, ``target_new`` and
``ground_truth`` (the true answer: a string, a list of strings, or a list of alias lists, as in
``benchmark_wiki_counterfact_test_cf.json``), and optionally ``rephrase_prompt`` (``rephrase``),
``portability`` and ``locality``: each ``{criterion: [{prompt, ground_truth}, ...]}`` (EasyEdit's
criteria: portability ``Reasoning``, ``Subject_Aliasing``, ``Logical_Generalization``; locality
``Relation_Specificity``, ``Forgetfulness``). KnowEdit's alternative names ``concept``, ``text``
and ``labels`` are read for ``subject``, ``prompt`` and ``target_new``, as its loader does.

Per record (ids ``dataset:record:part``, record id its ``case_id``/``id`` or its 0-based
position; every piece's question id is the record id), all cloze pieces:

- ``edit`` (hop 0): ``prompt`` -> ``target_new``, ``answer_before`` the first ``ground_truth``,
  triple (subject, ``relation`` or "edited fact", target_new). The subject must be in the prompt
  (EasyEdit's ROME asserts it): else the record is rejected, naming the field;
- ``original`` (hop 0): ``prompt`` -> ground truth, when the record gives one;
- tests (hop 2, ``edit_id`` the edit): ``rephrase_prompt`` -> target_new (criterion
  ``paraphrase``); each portability query -> its ground truth (criterion: its key); each locality
  query -> its ground truth (criterion: its key when it is a known locality criterion,
  :data:`gradcouple.rules.STABLE_CRITERIA`, else ``locality``), an answer the edit should leave.

A query's ``prompt`` may be a list of prompts (one test each, the ground truths aligned when
``ground_truth`` is a list as long); a ground truth's first name is the answer, the others its aliases.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..pieces import PieceKind, PieceRole
from ..rules import STABLE_CRITERIA
from ._common import RecordContext, RecordError, clean, record_id, req_dict, req_list, req_str

FORMAT = "easyedit"
PARAPHRASE = "paraphrase"
LOCALITY = "locality"


def sniff(record: Mapping) -> bool:
    """True when ``record`` looks like an EasyEdit / KnowEdit edit request."""
    return ("prompt" in record or "text" in record) and any(k in record for k in ("target_new", "labels", "subject", "concept")) \
        and "requested_rewrite" not in record and "answer" not in record


def answers(value: Any, path: str) -> list[str]:
    """A ground truth as names, answer first: a string, a list of strings, or a list of alias lists
    (flattened in order, as EasyEdit's ``while isinstance(an, list): an = an[0]`` takes the first)."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [clean(value)] if clean(value) else []
    out: list[str] = []
    for i, v in enumerate(req_list(value, path)):
        for name in answers(v, f"{path}[{i}]"):
            if name not in out:
                out.append(name)
    return out


def _first_of(record: Mapping, keys: tuple[str, ...]) -> str:
    for key in keys:
        if key in record and record[key] is not None:
            return key
    return keys[0]


def _queries(value: Any, path: str) -> list[tuple[str, list[str], str]]:
    """(prompt, names, field) of one criterion's queries: a list of {prompt, ground_truth}, or one
    {prompt: [...], ground_truth: [...]} (EasyEdit's in-memory form)."""
    items = [value] if isinstance(value, Mapping) else req_list(value, path)
    out = []
    for i, raw in enumerate(items):
        where = path if isinstance(value, Mapping) else f"{path}[{i}]"
        q = req_dict(raw, where)
        prompts = q.get("prompt")
        names = answers(q.get("ground_truth"), f"{where}.ground_truth") if q.get("ground_truth") is not None else []
        if not names:
            raise RecordError(f"{where}.ground_truth", "missing" if q.get("ground_truth") is None else "empty",
                              "query without a ground truth")
        if isinstance(prompts, list):
            truths = q["ground_truth"] if isinstance(q["ground_truth"], list) and len(q["ground_truth"]) == len(prompts) \
                and len(prompts) > 1 else None
            for k, p in enumerate(prompts):
                own = answers(truths[k], f"{where}.ground_truth[{k}]") if truths is not None else names
                out.append((req_str({f"prompt[{k}]": p}, f"prompt[{k}]", where), own, f"{where}.prompt[{k}]"))
        else:
            out.append((req_str(q, "prompt", where), names, f"{where}.prompt"))
    return out


def parse(record: Mapping, ctx: RecordContext) -> None:
    """Add the edit, its original and its test pieces.

    Raises:
        RecordError: a missing or empty prompt, subject or target_new, a subject the prompt does not
            mention, or a malformed query (the message names the field).
    """
    ctx.record_id = record_id(record, ("case_id", "id"), ctx.index, required=False)
    prompt = req_str(record, _first_of(record, ("prompt", "text")))
    subject = req_str(record, _first_of(record, ("subject", "concept")))
    target_key = _first_of(record, ("target_new", "labels"))
    new = answers(record.get(target_key), target_key) if record.get(target_key) is not None else []
    if not new:
        raise RecordError(target_key, "missing" if record.get(target_key) is None else "empty", "edit without a target")
    true = answers(record.get("ground_truth"), "ground_truth") if record.get("ground_truth") is not None else []
    if subject.casefold() not in prompt.casefold():
        raise RecordError("subject", f"{subject!r} is not in the prompt {prompt!r}; ROME and MEMIT read the key at the "
                          f"subject's last token", "subject not in the prompt")
    relation = clean(record.get("relation") or record.get("relation_id") or "") or "edited fact"
    base = f"{ctx.dataset}:{ctx.record_id}"
    edit = ctx.add(0, PieceKind.cloze, prompt, new[0], field="prompt", piece_id=f"{base}:edit", role=PieceRole.edit,
                   answer_before=true[0] if true else None, triple=(subject, relation, new[0]))
    if edit is None:
        return
    if true:
        ctx.add(0, PieceKind.cloze, prompt, true[0], field="ground_truth", aliases=true[1:], piece_id=f"{base}:original",
                role=PieceRole.original, edit_id=edit.id, counterfactual=new[0])
    rephrase_key = _first_of(record, ("rephrase_prompt", "rephrase"))
    rephrasings = record.get(rephrase_key)
    if rephrasings is not None:
        texts = rephrasings if isinstance(rephrasings, list) else [rephrasings]
        for k, text in enumerate(texts):
            where = f"{rephrase_key}[{k}]" if isinstance(rephrasings, list) else rephrase_key
            ctx.add(2, PieceKind.cloze, req_str({where: text}, where), new[0], field=where, aliases=new[1:],
                    piece_id=f"{base}:{PARAPHRASE}.{k}", role=PieceRole.test, edit_id=edit.id, criterion=PARAPHRASE,
                    answer_before=true[0] if true else None)
    for part in ("portability", "locality"):
        if record.get(part) is None:
            continue
        for key, value in req_dict(record[part], part).items():
            criterion = clean(key) if part == "portability" or clean(key) in STABLE_CRITERIA else LOCALITY
            for k, (text, names, where) in enumerate(_queries(value, f"{part}.{key}")):
                ctx.add(2, PieceKind.cloze, text, names[0], field=where, aliases=names[1:],
                        piece_id=f"{base}:{part}.{clean(key)}.{k}", role=PieceRole.test, edit_id=edit.id,
                        criterion=criterion)
