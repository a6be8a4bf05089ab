"""Edit files for the forecast science: held-out RippleEdits records written as an EasyEdit / KnowEdit
JSON file and as a CounterFact file, the formats editing engineers hand to EasyEdit and ROME.

    python benchmarks/forecast_files.py --skip 30 --out runs/science/forecast/edits

Reads the bundled RippleEdits sample (restructured Compositionality-I records, 60), skips the first
``--skip`` (the run is extracted from those), and writes for each remaining record:

* ``knowedit.json`` (EasyEdit's KnowEdit layout, as KnowEdit built its WikiData sets from
  RippleEdits): ``subject``, ``prompt`` (the edit prompt without its new target), ``target_new``,
  ``ground_truth`` (the true target, as a list of alias lists), ``portability.Reasoning`` = the
  record's compositional queries (answers after the edit), ``locality.Condition`` = their condition
  queries (facts about the new target, which the edit should leave: criterion ``locality``);
* ``counterfact.json`` (ROME's layout): ``requested_rewrite`` with the prompt as a ``{}`` template,
  ``paraphrase_prompts`` from two hand-written paraphrase templates of the edited relation
  (:data:`PARAPHRASES`), ``neighborhood_prompts`` = the edit prompts of the other records of the
  sample with the same relation and the same true target (CounterFact's definition of a
  neighbourhood), up to five.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: two paraphrases per relation of the bundled records, '{}' where the subject goes
PARAPHRASES = {
    "COUNTRY_OF_CITIZENSHIP": ["{} is a citizen of", "{} holds the citizenship of"],
    "COUNTRY": ["{} is associated with the country", "The country of {} is"],
    "MOTHER": ["{}'s mother is", "The mother of {} is named"],
    "FATHER": ["{}'s father is", "The father of {} is named"],
    "SPOUSE": ["{} is married to", "{}'s spouse is"],
    "COMPOSER": ["The music of {} was composed by", "The score of {} is by"],
    "SCREENWRITER": ["{} was written for the screen by", "The screenplay of {} is by"],
    "DIRECTOR": ["{} was directed by", "The director of {} is"],
    "PLACE_OF_BIRTH": ["{} was born in", "The birthplace of {} is"],
    "AUTHOR": ["{} was written by", "The author of {} is"],
}


def _prompt(edit: dict) -> str:
    """The edit prompt without its trailing new target and final period."""
    text = edit["prompt"].rstrip().removesuffix(".").rstrip()
    return text[: -len(edit["target_id"])].rstrip() if text.endswith(edit["target_id"]) else text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip", type=int, default=30, help="records the run is extracted from (left out here)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many records after --skip")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from gradcouple.datasets import sample_path

    records = [json.loads(line) for line in sample_path("rippleedits").read_text(encoding="utf-8").splitlines() if line.strip()]
    knowedit, counterfact = [], []
    end = None if args.limit is None else args.skip + args.limit
    for k, rec in enumerate(records[args.skip:end], start=args.skip):
        e = rec["edit"]
        subject, relation, new, true = e["subject_id"], e["relation"], e["target_id"], e["original_fact"]["target_id"]
        prompt = _prompt(e)
        problems = rec.get("compositional_I_problems", [])
        knowedit.append({
            "case_id": k, "subject": subject, "prompt": prompt, "target_new": new, "ground_truth": [[true]],
            "relation": relation,
            "portability": {"Reasoning": [{"prompt": p["compositional_query"]["prompt"],
                                           "ground_truth": [[p["compositional_query"]["answer"]]]} for p in problems]},
            "locality": {"Condition": [{"prompt": p["condition_query"]["prompt"],
                                        "ground_truth": [[p["condition_query"]["answer"]]]} for p in problems]},
        })
        neighbours = [_prompt(o["edit"]) for j, o in enumerate(records) if j != k and o["edit"]["relation"] == relation
                      and o["edit"]["original_fact"]["target_id"] == true][:5]
        counterfact.append({
            "case_id": k,
            "requested_rewrite": {"prompt": prompt.replace(subject, "{}", 1), "relation_id": relation, "subject": subject,
                                  "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": [t.format(subject) for t in PARAPHRASES.get(relation, [])],
            "neighborhood_prompts": neighbours,
            "attribute_prompts": [], "generation_prompts": [],
        })
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in (("knowedit.json", knowedit), ("counterfact.json", counterfact)):
        (args.out / name).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
