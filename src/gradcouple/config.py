"""One pydantic ``RunConfig`` shared by every stage, loadable from YAML, saved resolved per run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

from .errors import ConfigError
from .io import write_json
from .pieces import DEFAULT_PROMPT_TEMPLATE, not_utf8, reencode_hint

DEFAULT_MODEL = "smollm2-135m"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Which knowledge pieces to score and how their prompts read."""

    pieces: Optional[Path] = Field(default=None, description="pieces.jsonl; None = the bundled real sample", json_schema_extra={"flag": "--data"})
    limit: Optional[int] = Field(default=None, ge=1, description="Use only the first N pieces", json_schema_extra={"flag": "--limit"})
    prompt_template: str = Field(default=DEFAULT_PROMPT_TEMPLATE, description="Template for question pieces; must contain {question}", json_schema_extra={"flag": "--prompt-template"})

    @field_validator("prompt_template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("must contain the placeholder {question}")
        return v


class ModelConfig(_Section):
    """The causal LM and the layers whose weights define theta."""

    name: str = Field(default=DEFAULT_MODEL, description="Hub id, local dir, .gguf file or alias", json_schema_extra={"flag": "--model"})
    revision: Optional[str] = Field(default=None, description="Hub revision (branch, tag or commit)", json_schema_extra={"flag": "--revision"})
    layers: str = Field(default="last4", description="'last4', 'lastN', 'all', '26-29', '0,5,11' or 're:<module regex>'", json_schema_extra={"flag": "--layers"})
    module: Optional[str] = Field(default=None, description="Module name inside each block, e.g. 'mlp.down_proj'; None = the architecture's default", json_schema_extra={"flag": "--module"})
    device: str = Field(default="auto", description="cpu, cuda, cuda:N, mps, auto, or auto-map (a model larger than one GPU spread over all of them)", json_schema_extra={"flag": "--device"})
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Compute dtype of the weights (on GPU, 16-bit products accumulate in fp32)", json_schema_extra={"flag": "--dtype"})
    threads: Optional[int] = Field(default=None, ge=1, description="torch CPU threads; None = torch's default, which follows OMP_NUM_THREADS", json_schema_extra={"flag": "--threads"})


class ExtractConfig(_Section):
    """Per-example gradient extraction into fp16 shards."""

    store: Literal["factors", "dense", "projected"] = Field(default="factors", description="Shard format", json_schema_extra={"flag": "--store"})
    batch_size: int = Field(default=16, ge=1, description="Pieces per forward/backward (halved on CUDA OOM)", json_schema_extra={"flag": "--batch-size"})
    shard_size: int = Field(default=64, ge=1, description="Pieces per shard file (the unit of resume)", json_schema_extra={"flag": "--shard-size"})
    proj_dim: int = Field(default=4, ge=1, description="k_in = k_out of each Kronecker sketch (store=projected)", json_schema_extra={"flag": "--proj-dim"})
    proj_blocks: int = Field(default=256, ge=1, description="Independent k x k sketches per target (store=projected); blocks*k^2 numbers", json_schema_extra={"flag": "--proj-blocks"})
    seed: int = Field(default=0, description="Projection seed")
    max_length: int = Field(default=256, ge=4, description="Token limit of prompt+answer; longer prompts are cut from the left", json_schema_extra={"flag": "--max-length"})


class CoupleConfig(_Section):
    """Gram / cosine (GradSim) computation."""

    block_size: int = Field(default=256, ge=1, description="Pieces per block of the blocked all-pairs product", json_schema_extra={"flag": "--block-size"})
    top_k: Optional[int] = Field(default=None, ge=1, description="Keep only the K nearest pieces per row instead of N x N", json_schema_extra={"flag": "--top-k"})
    max_memory: Optional[float] = Field(default=None, gt=0, description="Memory bound in GiB (default: 1/4 of RAM)", json_schema_extra={"flag": "--max-memory"})
    top_pairs: int = Field(default=50, ge=1, description="Rows of pairs.csv", json_schema_extra={"flag": "--top-pairs"})
    thresholds: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7], description="Cosine thresholds counted in stats.json")
    method: Literal["auto", "factored", "dense"] = Field(default="auto", description="Gram algorithm for the factors store", json_schema_extra={"flag": "--method"})


class RippleConfig(_Section):
    """Real edits and their measured ripple effect."""

    edits: Literal["auto", "benchmark", "pieces"] = Field(default="auto", description="benchmark: the edits and test queries the pieces carry (RippleEdits, MQuAKE); pieces: edit pieces toward counterfactuals and measure every other piece; auto: benchmark when the pieces carry edits", json_schema_extra={"flag": "--edits"})
    n_edits: int = Field(default=10, ge=1, description="How many edits to make (one at a time)", json_schema_extra={"flag": "--n-edits"})
    method: Literal["ft", "rome"] = Field(default="ft", description="ft: fine-tuning, Adam on all target layers (early stop; FT-L with max_delta); rome: rank-one update of one target layer", json_schema_extra={"flag": "--method"})
    steps: int = Field(default=25, ge=1, description="Adam steps per ft edit (at most, with early stop; 25 as FT in the ROME paper)", json_schema_extra={"flag": "--steps"})
    lr: float = Field(default=5e-4, gt=0, description="Adam learning rate of an ft edit (5e-4 as FT in the ROME paper)", json_schema_extra={"flag": "--lr"})
    max_delta: Optional[float] = Field(default=None, gt=0, description="FT-L bound on every weight's change |dw| (L-infinity); None = unbounded", json_schema_extra={"flag": "--max-delta"})
    early_stop: bool = Field(default=True, description="Stop an ft edit once the new target is the greedy continuation")
    rome_layer: int = Field(default=0, description="Index into the target layers of the layer a rome edit changes (0 = lowest)")
    rome_steps: int = Field(default=20, ge=1, description="Adam steps optimising the rome value vector")
    rome_lr: float = Field(default=0.5, gt=0, description="Adam learning rate of the rome value vector")
    rome_clamp: float = Field(default=4.0, gt=0, description="Max |delta| of the rome value as a multiple of |W k*|", json_schema_extra={"flag": "--rome-clamp"})
    covariance: Literal["wikipedia", "pieces"] = Field(default="wikipedia", description="Key covariance of rome: layer inputs on the Wikipedia paragraphs bundled with the package, or on the run's own pieces")
    covariance_tokens: int = Field(default=50_000, ge=256, description="Tokens of Wikipedia text for the rome key covariance")
    seed: int = Field(default=0, description="Choice of edited pieces, substitute counterfactuals and the shuffled baseline", json_schema_extra={"flag": "--seed"})
    top_k: int = Field(default=10, ge=1, description="k of precision@k")
    sweep: Optional[list[PositiveFloat]] = Field(default=None, description="Benchmark mode: evaluate the same edits at each of these strengths (ft: lr; rome: rome_clamp) into ripple/sweep.json")
    bootstrap_resamples: int = Field(default=1000, ge=10, description="Resamples of whole edits behind each correlation's interval (benchmark mode)")

    @field_validator("method", mode="before")
    @classmethod
    def _finetune_is_ft(cls, v):
        return "ft" if v == "finetune" else v


class ReportConfig(_Section):
    """HTML report."""

    max_heatmap: int = Field(default=200, ge=2, description="Largest N drawn as a full heatmap", json_schema_extra={"flag": "--max-heatmap"})


class RunConfig(_Section):
    """Every stage's settings. ``extract_hash`` covers exactly what changes the gradients."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    couple: CoupleConfig = Field(default_factory=CoupleConfig)
    ripple: RippleConfig = Field(default_factory=RippleConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    def _hash(self, d: dict) -> str:
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def extract_hash(self) -> str:
        """sha256 (16 hex) of the settings that determine the shards' contents: not the device or batch size,
        nor the pieces file's path (its sha256 is an input of its own, so a moved file stays current)."""
        return self._hash({
            "data": self.data.model_dump(mode="json", exclude={"pieces"}),
            "model": self.model.model_dump(mode="json", exclude={"device", "threads"}),
            "extract": self.extract.model_dump(mode="json", exclude={"batch_size"}),
        })

    def couple_hash(self) -> str:
        """sha256 (16 hex) of the couple settings that change its results (not memory or block size)."""
        return self._hash(self.couple.model_dump(mode="json", include={"top_k", "top_pairs", "thresholds", "method"}))

    def ripple_hash(self) -> str:
        """sha256 (16 hex) of the ripple settings."""
        return self._hash(self.ripple.model_dump(mode="json"))

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as JSON (atomic)."""
        write_json(path, self.model_dump(mode="json"))


def flag_names() -> dict[str, str]:
    """``"section.field" -> "--flag"``, read from each field's ``json_schema_extra``: the one flag map."""
    out = {}
    for section, info in RunConfig.model_fields.items():
        for name, field in info.annotation.model_fields.items():
            extra = field.json_schema_extra or {}
            if "flag" in extra:
                out[f"{section}.{name}"] = extra["flag"]
    return out


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML or JSON config and apply dotted overrides like ``{"model.name": "gpt2"}``.

    ``None`` override values are ignored, so CLI flags left unset keep the file's values. An
    invalid override is reported under its flag name (:func:`flag_names`).

    Raises:
        ConfigError: unreadable file, a file that is not UTF-8 (the message names the byte offset
            and line), or an invalid field; the message names the file and field.
    """
    raw: dict[str, Any] = {}
    src = "flags"
    if path is not None:
        src = str(path)
        try:
            data = Path(path).read_bytes()
            raw = yaml.safe_load(data.decode("utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror}).") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: {not_utf8(e, data)}; {reencode_hint(path)}.") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e}).") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config is a mapping with sections data/model/extract/couple/ripple/report.")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, field = key.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{src}: section '{section}' must be a mapping.")
        raw[section][field] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        given = (overrides or {}).get(loc)
        if given is not None:
            flag = flag_names().get(loc, loc)
            raise ConfigError(f"{flag} {given!r}: {err['msg']}.") from None
        raise ConfigError(f"{src}: field '{loc}': {err['msg']} (got {err.get('input')!r}).") from None


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable 'section.field: old -> new' lines where two config dicts differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
