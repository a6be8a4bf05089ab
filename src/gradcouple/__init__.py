"""gradcouple: per-example gradient coupling of knowledge pieces in causal language models.

Stages (each reads only files, so each reruns alone): ``download`` -> pieces.jsonl, ``extract`` ->
gradient shards, ``couple`` -> GradSim matrix, ``ripple`` -> measured edit ripple effects,
``forecast`` -> which stored pieces an edit will move before it is made, ``report`` -> HTML +
summary.json. From Python, the same stages as plain functions
(:mod:`gradcouple.api`)::

    import gradcouple as gc
    gc.extract("runs/nb", data="pieces.jsonl"); gc.couple("runs/nb")
    run = gc.load_run("runs/nb")

The stages' library functions (``cfg``, ``run_dir``) live in :mod:`gradcouple.stages`.
"""

from ._version import __version__

_API = ("download", "extract", "couple", "ripple", "forecast", "report", "run", "load_run", "Run", "RunConfig")


def __getattr__(name: str):
    if name in _API:
        # deferred: the API imports torch, transformers and pandas, and `import gradcouple` (the CLI's
        # `--help` included) should not pay for them
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'gradcouple' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
