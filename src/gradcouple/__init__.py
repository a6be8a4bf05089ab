"""gradcouple: per-example gradient coupling of knowledge pieces in causal language models.

Stages (each reads only files, so each reruns alone): ``download`` -> pieces.jsonl, ``extract`` ->
gradient shards, ``couple`` -> GradSim matrix, ``ripple`` -> measured edit ripple effects,
``report`` -> HTML + summary.json. From Python (see :mod:`gradcouple.api`)::

    import gradcouple as gc
    gc.extract("runs/nb", data="pieces.jsonl"); gc.couple("runs/nb")
    run = gc.load_run("runs/nb")
"""

__version__ = "0.1.0"

_STAGES = {"extract", "couple", "ripple", "report"}


def __getattr__(name: str):
    # the API imports torch and pandas: only on first use, so `import gradcouple` stays cheap
    if name in _STAGES:  # the stage module, callable as the API function (see _callable.py)
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name in ("load_run", "Run"):
        from . import api

        return getattr(api, name)
    if name == "download":
        from .datasets import download

        return download
    if name == "RunConfig":
        from .config import RunConfig

        return RunConfig
    raise AttributeError(f"module 'gradcouple' has no attribute {name!r}")


__all__ = ["__version__", "load_run", "Run", "extract", "couple", "ripple", "report", "download", "RunConfig"]
