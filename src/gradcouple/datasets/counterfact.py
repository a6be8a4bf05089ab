"""CounterFact edit requests (Meng et al., NeurIPS 2022, "Locating and Editing Factual Associations
in GPT"; kmeng01/rome, ``dsets/counterfact.py`` and ``experiments/py/eval_utils_counterfact.py``),
the format MEMIT's and EasyEdit's CounterFact files share.

A record has ``case_id``, ``requested_rewrite`` = {``prompt`` (with ``{}`` where the subject goes),
``subject``, ``relation_id``, ``target_new`` {str, id}, ``target_true`` {str, id}},
``paraphrase_prompts`` (the rewritten fact asked another way, each after a short distracting
prefix) and ``neighborhood_prompts`` (prompts about other subjects whose answer is
``target_true`` and must stay so). ``attribute_prompts`` and ``generation_prompts`` (fluency and
consistency of generated text) are not read.

Per record (ids ``counterfact:<case_id>:part``; question id the case id), all cloze pieces:

- ``edit`` (hop 0): ``prompt.format(subject)`` -> ``target_new.str``, ``answer_before``
  ``target_true.str``, triple (subject, relation_id, target_new);
- ``original`` (hop 0): the same prompt -> ``target_true.str``;
- tests (hop 2, ``edit_id`` the edit): each paraphrase prompt -> ``target_new.str`` (criterion
  ``paraphrase``), each neighbourhood prompt -> ``target_true.str`` (criterion ``neighborhood``,
  one of :data:`gradcouple.rules.STABLE_CRITERIA`).
"""

from __future__ import annotations

from typing import Mapping

from ..pieces import PieceKind, PieceRole
from ._common import RecordContext, RecordError, clean, record_id, req_dict, req_str, str_list

FORMAT = "counterfact"
PARAPHRASE = "paraphrase"
NEIGHBORHOOD = "neighborhood"


def sniff(record: Mapping) -> bool:
    """True when ``record`` looks like a CounterFact record (its ``requested_rewrite`` is one object;
    MQuAKE's is a list)."""
    return isinstance(record.get("requested_rewrite"), Mapping)


def parse(record: Mapping, ctx: RecordContext) -> None:
    """Add the edit, its original, and its paraphrase and neighbourhood tests.

    Raises:
        RecordError: a missing or malformed field, a prompt without ``{}``, a subject that is empty
            (the message names the field).
    """
    ctx.record_id = record_id(record, ("case_id", "id"), ctx.index, required=False)
    rw = req_dict(record.get("requested_rewrite"), "requested_rewrite")
    template = req_str(rw, "prompt", "requested_rewrite")
    subject = req_str(rw, "subject", "requested_rewrite")
    if "{}" not in template:
        raise RecordError("requested_rewrite.prompt", f"expected a '{{}}' placeholder for the subject, got {template!r}",
                          "rewrite prompt without '{}'")
    new = req_str(req_dict(rw.get("target_new"), "requested_rewrite.target_new"), "str", "requested_rewrite.target_new")
    true = req_str(req_dict(rw.get("target_true"), "requested_rewrite.target_true"), "str", "requested_rewrite.target_true")
    relation = clean(rw.get("relation_id") or "") or "edited fact"
    prompt = clean(template.replace("{}", subject, 1))
    base = f"{ctx.dataset}:{ctx.record_id}"
    edit = ctx.add(0, PieceKind.cloze, prompt, new, field="requested_rewrite.prompt", piece_id=f"{base}:edit",
                   role=PieceRole.edit, answer_before=true, triple=(subject, relation, new))
    if edit is None:
        return
    ctx.add(0, PieceKind.cloze, prompt, true, field="requested_rewrite.target_true", piece_id=f"{base}:original",
            role=PieceRole.original, edit_id=edit.id, counterfactual=new)
    for key, criterion, answer, before in (("paraphrase_prompts", PARAPHRASE, new, true),
                                           ("neighborhood_prompts", NEIGHBORHOOD, true, None)):
        for k, text in enumerate(str_list(record.get(key), key)):
            ctx.add(2, PieceKind.cloze, text, answer, field=f"{key}[{k}]", piece_id=f"{base}:{criterion}.{k}",
                    role=PieceRole.test, edit_id=edit.id, criterion=criterion, answer_before=before)
