"""The one config resolver, shared by the CLI and the Python API: what a stage was given (flags or
keywords, a config file) on top of what the run already has, checked by the rules of
:class:`~gradcouple.config.RunConfig` so that both refuse the same things with the same line.

A keyword is a flag without its dashes (``--n-edits`` -> ``n_edits``); a dotted field
(``"ripple.covariance"``) sets a setting that has no flag. Each stage takes the keywords of
:data:`STAGE_KEYWORDS` and the dotted fields of :data:`STAGE_SECTIONS`; anything else is refused,
naming it. The base the given settings go on: a config file when one is given (its settings
count as given, exactly like the same flags), else the run directory's ``config.json``, else
the defaults. Help texts come from the fields' descriptions (:func:`help_text`), and
``configs/default.yaml`` is :func:`default_yaml`.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from .config import Given, GivenField, RunConfig, flag_names, read_config_file, validate_config
from .edits import ALIASES, METHODS, method_class
from .errors import ConfigError
from .rundir import RunDir

#: method knob keyword -> the dotted field it sets for whichever method is chosen
KNOB_KEYWORDS: dict[str, str] = {flag.lstrip("-").replace("-", "_"): f"ripple.hparams.*.{knob}"
                                 for cls in METHODS.values() for knob, flag in cls.knobs().items() if flag}

#: the keywords (flags without dashes) each stage takes
STAGE_KEYWORDS: dict[str, tuple[str, ...]] = {
    "extract": ("data", "limit", "prompt_template", "model", "layers", "module", "device", "dtype", "threads", "store",
                "batch_size", "shard_size", "proj_dim", "proj_blocks", "max_length"),
    "couple": ("model", "data", "layers", "device", "threads", "max_length", "top_k", "max_memory", "block_size",
               "top_pairs", "method", "couple_layers"),
    "ripple": ("edits", "n_edits", "method", "hparams", "sweep", "layer_sweep", "batch_size", "sequential", "full_model", "seed",
               "device", "threads", *KNOB_KEYWORDS),
    "forecast": ("method", "hparams", "predictor", "top_k", "verify", "precision", "seed", "device", "threads"),
    "report": ("max_heatmap",),
    "run": ("data", "limit", "model", "layers", "store", "batch_size", "max_length", "device", "threads", "edits",
            "n_edits", "method", "hparams"),
}
#: the config sections whose fields a stage takes as dotted keywords (and from a config file)
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "extract": ("data", "model", "extract"), "couple": ("data", "model", "extract", "couple"),
    "ripple": ("model", "ripple"), "forecast": ("model", "ripple", "forecast"), "report": ("report",),
    "run": ("data", "model", "extract", "couple", "ripple", "report"),
}
#: keywords naming a field of several sections: the section each stage means
_SECTION_OF = {("couple", "method"): "couple.method", ("ripple", "method"): "ripple.method",
               ("run", "method"): "ripple.method", ("forecast", "method"): "ripple.method",
               ("forecast", "top_k"): "forecast.top_k", ("ripple", "batch_size"): "ripple.batch_size",
               ("run", "batch_size"): "extract.batch_size"}


def keyword_field(stage: str, keyword: str) -> str:
    """The dotted field ``keyword`` sets in ``stage`` (a method knob: ``ripple.hparams.*.<knob>``).

    Raises:
        ConfigError: the keyword is not one of the stage's (the message says where it belongs).
    """
    if keyword not in STAGE_KEYWORDS[stage]:
        users = [s for s, kws in STAGE_KEYWORDS.items() if keyword in kws]
        where = f"it is an option of {', '.join(users)}" if users else f"{stage}'s are {', '.join(STAGE_KEYWORDS[stage])}"
        raise ConfigError(f"{stage}(): {keyword}= does not apply to {stage} ({where}); drop it, or pass a dotted field "
                          f"such as 'ripple.covariance' for a setting without a flag.")
    if keyword in KNOB_KEYWORDS:
        return KNOB_KEYWORDS[keyword]
    if (stage, keyword) in _SECTION_OF:
        return _SECTION_OF[stage, keyword]
    flag = "--" + keyword.replace("_", "-")
    return next(d for d, f in flag_names().items() if f == flag)


def _given_fields(stage: str, keywords: dict[str, Any], file: Optional[Path], raw_file: dict) -> dict[str, GivenField]:
    """What was given: a config file's settings (those that differ from their defaults, so that a
    file of defaults such as configs/default.yaml sets nothing) and the keywords."""
    out: dict[str, GivenField] = {}
    flags, defaults = flag_names(), RunConfig().model_dump(mode="json")
    for section, values in raw_file.items():
        for name, value in (values or {}).items():
            if section == "ripple" and name == "hparams" and isinstance(value, dict):
                for method, knobs in value.items():
                    for knob, v in (knobs or {}).items():
                        if v != _knob_default(method, knob):
                            out[f"ripple.hparams.{method}.{knob}"] = GivenField(f"ripple.hparams.{method}.{knob}", v,
                                                                                str(file))
                continue
            if value is None or value == defaults.get(section, {}).get(name, object()):
                continue
            dotted = f"{section}.{name}"
            out[dotted] = GivenField(flags.get(dotted, dotted), value, str(file))
    for keyword, value in keywords.items():
        if value is None:
            continue
        if "." in keyword:
            section = keyword.partition(".")[0]
            if section not in STAGE_SECTIONS[stage]:
                raise ConfigError(f"{stage}(): {keyword!r} is a setting of the {section} stage, not of {stage}; drop it.")
            out[keyword] = GivenField(keyword, value)
        else:
            out[keyword_field(stage, keyword)] = GivenField("--" + keyword.replace("_", "-"), value)
    return out


def _knob_default(method: str, knob: str) -> Any:
    cls = METHODS.get(method)
    f = cls.Hparams.model_fields.get(knob) if cls else None
    return f.get_default(call_default_factory=True) if f else object()


def _check_file_sections(file: Path, raw: dict) -> None:
    known = set(RunConfig.model_fields)
    for section in raw:
        if section not in known:
            raise ConfigError(f"{file}: unknown section '{section}'; a config has sections {', '.join(known)}.")


def _raw(base: RunConfig, given: dict[str, GivenField]) -> dict[str, Any]:
    raw = base.model_dump(mode="json")
    method = given["ripple.method"].value if "ripple.method" in given else raw["ripple"]["method"]
    method = raw["ripple"]["method"] = ALIASES.get(method, method)
    for dotted, f in given.items():
        value = str(f.value) if isinstance(f.value, Path) else f.value
        parts = dotted.split(".")
        if parts[:2] == ["ripple", "hparams"]:
            owner = method if parts[2] == "*" else parts[2]
            raw["ripple"]["hparams"].setdefault(owner, {})[parts[3]] = value
        elif dotted != "ripple.method":
            raw[parts[0]][parts[1]] = value
    return raw


def _extraction(run: RunDir, given: Given) -> None:
    """What the run's extraction was made with, when it has a readable one (the stage itself reports
    a damaged one)."""
    man = run.gradients.header()
    if man is None:
        return
    given.extracted = man.settings()
    given.extracted_pieces = (man.pieces_file, man.inputs.values.get("pieces", ""))
    given.extracted_names = man.names


def _carries_benchmark_edits(run: RunDir) -> Optional[bool]:
    try:
        with open(run.pieces_path, encoding="utf-8") as fh:
            return any(json.loads(line).get("role") == "edit" for line in fh if line.strip())
    except (OSError, ValueError, AttributeError):
        return None


def resolve(stage: str, run_dir: Optional[str | Path] = None, *, cfg: Optional[RunConfig] = None,
            config: Optional[str | Path] = None, options: Optional[dict[str, Any]] = None, **keywords: Any) -> RunConfig:
    """The config ``stage`` runs with in ``run_dir``: ``cfg`` (else the config file ``config``, else the
    run's saved config.json, else the defaults) with ``keywords`` applied, checked by the rules.

    ``keywords`` are the stage's flags without dashes (None: not given) or dotted fields;
    ``options`` are the stage's flags that are not config fields (``run``: datasets, no_ripple).
    Nothing is written, and ``cfg`` is not modified.

    Raises:
        ConfigError: a keyword that does not apply to the stage, an invalid value, or a setting the
            stage could not honour; the message names the flag (or the file and field) and the fix.
    """
    file_raw: dict = {}
    run = RunDir(run_dir) if run_dir is not None else None
    if config is not None:
        file_raw = read_config_file(config)
        _check_file_sections(Path(config), file_raw)
        base = validate_config({k: dict(v or {}) for k, v in file_raw.items()}, str(config))
    elif cfg is not None:
        base = cfg
    elif run is not None and run.saved_config_path():
        base = validate_config(_read_json(run.config_path), str(run.config_path))
    elif run is not None and stage == "extract" and (head := run.gradients.header()) is not None:
        base = _resumed(head)  # an interrupted extraction (no config.json yet): resume it as it was started
    else:
        base = RunConfig()
    fields = _given_fields(stage, keywords, Path(config) if config is not None else None, file_raw)
    given = Given(stage=stage, fields=fields, run_dir=run.root if run else None,
                  methods={name: (c.knobs(), c.strength) for name, c in METHODS.items()},
                  options={k: v for k, v in (options or {}).items() if v}, cuda=torch.cuda.is_available())
    if run is not None and stage in ("couple", "ripple", "forecast"):
        _extraction(run, given)
        if "ripple.sweep" in fields:
            given.benchmark = _carries_benchmark_edits(run)
    resolved = validate_config(_raw(base, fields), str(config) if config else "flags", given)
    if stage in ("ripple", "run", "forecast"):
        name = resolved.ripple.method
        method_class(name).resolve(resolved.ripple.hparams.get(name))  # an invalid knob value, named by its flag
    return resolved


def _resumed(head) -> RunConfig:
    """The settings an interrupted extraction was started with, its pieces file included."""
    settings = head.settings()
    return settings.model_copy(update={"data": settings.data.model_copy(update={"pieces": Path(head.pieces_file)})})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable saved config ({e}); delete it or rerun the stage that wrote it.") from None


# ----------------------------------------------------------------------------- help texts and default.yaml


def help_text(dotted: str) -> str:
    """The help of the setting ``dotted`` (``model.layers``, or a knob ``ripple.hparams.ft.lr``): its
    field's description, and its default."""
    parts = dotted.split(".")
    if parts[:2] == ["ripple", "hparams"]:
        f = method_class(parts[2]).Hparams.model_fields[parts[3]]
        text = f"{f.description} (--method {parts[2]}; default {_default(f)})"
    else:
        f = RunConfig.model_fields[parts[0]].annotation.model_fields[parts[1]]
        text = f"{f.description} (default {_default(f)})"
    if dotted == "ripple.method":
        text = f"{f.description}: " + "; ".join(f"{n}, {c.summary}" for n, c in METHODS.items()) + f" (default {_default(f)})"
    return text + "."


def _default(f) -> str:
    value = f.get_default(call_default_factory=True)
    return "none" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def default_yaml() -> str:
    """``configs/default.yaml``: every setting at its default, each with its description as a comment
    (the methods' knobs under ``ripple.hparams``)."""
    lines = ["# gradcouple's settings at their defaults, generated from the RunConfig field descriptions",
             "# (src/gradcouple/config.py; regenerate with `make configs`). Use: gradcouple run --config configs/default.yaml",
             "# Flags override this file; a stage refuses a setting here exactly as it refuses the same flag."]
    defaults = RunConfig().model_dump(mode="json")
    for section, info in RunConfig.model_fields.items():
        lines += ["", f"{section}:  # {info.annotation.__doc__.strip()}"]
        for name, f in info.annotation.model_fields.items():
            if section == "ripple" and name == "hparams":
                lines += _comment(f.description, 2) + ["  hparams:"]
                for method, cls in METHODS.items():
                    lines += _comment(cls.summary, 4) + [f"    {method}:"]
                    for knob, kf in cls.Hparams.model_fields.items():
                        flag = cls.knobs()[knob]
                        lines += _comment(kf.description + (f" ({flag})" if flag else ""), 6)
                        lines += [f"      {knob}: {_yaml(kf.get_default(call_default_factory=True))}"]
                continue
            flag = (f.json_schema_extra or {}).get("flag")
            lines += _comment(f.description + (f" ({flag})" if flag else ""), 2) + [f"  {name}: {_yaml(defaults[section][name])}"]
    return "\n".join(lines) + "\n"


def _comment(text: str, indent: int) -> list[str]:
    return textwrap.wrap(text, 118 - indent, initial_indent=" " * indent + "# ", subsequent_indent=" " * indent + "# ",
                         break_on_hyphens=False)


def _yaml(value: Any) -> str:
    if isinstance(value, str) and "\n" in value:
        return json.dumps(value)  # a JSON string is a YAML double-quoted scalar: one line, escapes kept
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").removesuffix("...").strip()


__all__ = ["KNOB_KEYWORDS", "STAGE_KEYWORDS", "STAGE_SECTIONS", "default_yaml", "help_text", "keyword_field", "resolve"]
