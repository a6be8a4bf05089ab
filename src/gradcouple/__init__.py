"""gradcouple: per-example gradient coupling of knowledge pieces in causal language models.

Stages (each reads only files, so each reruns alone):
``download`` -> pieces.jsonl, ``extract`` -> gradient shards, ``couple`` -> GradSim matrix,
``ripple`` -> measured edit ripple effects, ``report`` -> HTML + summary.json.
"""

__version__ = "0.1.0"
