"""Published hyperparameters per method and model, and the ``--hparams`` file.

``gradcouple/hparams/<method>/<model>.yaml`` (also reachable as ``configs/hparams``) holds one
model's settings of one method, as ROME's ``hparams/ROME/*.json`` and EasyEdit's
``hparams/ROME/*.yaml`` do: a ``model`` section that says which models it is for (fields of
the model's config) and an ``hparams`` section of knob values. A ``--hparams FILE`` may be such a
file or a reference file as it is (EasyEdit YAML, ROME/MEMIT/AlphaEdit JSON): its knobs are read,
the keys that only place modules or statistics in the reference code are set aside.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import EditMethod

log = logging.getLogger(__name__)

HPARAMS_DIR = Path(__file__).resolve().parent.parent / "hparams"

#: reference-code keys that locate modules, statistics or devices: read past, not knobs here
PLACEMENT_KEYS = frozenset({
    "alg_name", "model_name", "stats_dir", "device", "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp",
    "attn_module_tmp", "ln_f_module", "lm_head_module", "mom2_dataset", "mom2_n_samples", "mom2_dtype",
    "model_parallel", "P_loc", "layer_selection", "fp16", "max_length"})

#: a reference file's alg_name -> the methods that read it
ALG_NAMES = {"rome": ("rome",), "memit": ("memit",), "alphaedit": ("alphaedit",), "ft": ("ft-l", "ft")}


def _model_config(model) -> dict[str, Any]:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    out = {**text.to_dict(), "model_type": cfg.model_type}
    out.setdefault("num_hidden_layers", getattr(text, "n_layer", None))
    out.setdefault("hidden_size", getattr(text, "n_embd", None))
    return out


def published_hparams(method: str, model) -> tuple[dict[str, Any], Optional[Path]]:
    """The ``hparams`` section of the first file under ``HPARAMS_DIR/method`` whose ``model`` section
    matches ``model``'s config (every field equal), and that file; ({}, None) when none does."""
    folder = HPARAMS_DIR / method
    if not folder.is_dir():
        return {}, None
    config = _model_config(model)
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if all(config.get(k) == v for k, v in (data.get("model") or {}).items()):
            return dict(data.get("hparams") or {}), path
    return {}, None


def read_hparams_file(path: str | Path, method: "type[EditMethod]") -> dict[str, Any]:
    """Knob values from a settings file (YAML or JSON): gradcouple's own (an ``hparams`` section) or
    a reference file (flat; its placement keys set aside, its ``alg_name`` checked).

    Raises:
        ConfigError: the file is missing or unreadable, is for another method, or has a key that is
            neither a knob of ``method`` nor a placement key (the message names the file and key).
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"--hparams {path}: no such file.") from None
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"--hparams {path}: not a YAML or JSON file ({str(e).splitlines()[0]}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--hparams {path}: expected a mapping of knob: value, got {type(data).__name__}.")
    if isinstance(data.get("hparams"), dict):
        data = data["hparams"]
    alg = str(data.get("alg_name", "")).lower().replace("-", "").replace("_", "")
    if alg and method.name not in ALG_NAMES.get(alg, (alg,)):
        readers = ALG_NAMES.get(alg, (alg,))
        raise ConfigError(f"--hparams {path}: alg_name {data['alg_name']!r} is for --method {readers[0]}, and these "
                          f"edits are {method.name}; pass --method {readers[0]} or another file.")
    knobs = method.Hparams.model_fields
    out, aside = {}, []
    for key, value in data.items():
        if key in knobs:
            out[key] = value
        elif key in PLACEMENT_KEYS or key in method.unread:
            aside.append(key)
        else:
            raise ConfigError(f"--hparams {path}: {key!r} is not a knob of --method {method.name} "
                              f"({', '.join(knobs)}); remove it.")
    if aside:
        log.info(f"--hparams {path}: set aside {', '.join(aside)} (module placement and statistics: gradcouple edits "
                 f"the extraction's target layers with its own key statistics)")
    return out


__all__ = ["HPARAMS_DIR", "PLACEMENT_KEYS", "published_hparams", "read_hparams_file"]
