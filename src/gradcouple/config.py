"""One pydantic ``RunConfig`` shared by every stage, loadable from YAML, saved resolved per run.

Each field's description is the one help text of its setting: the CLI's ``--help`` and the
comments of ``configs/default.yaml`` are generated from it (:mod:`gradcouple.resolve`). The
cross-field rules (a flag that a stage could not honour) are the model validator of
:class:`RunConfig`; they run when the config is validated with a :class:`Given` as context, which
the one resolver (:func:`gradcouple.resolve.resolve`) does for the CLI and the Python API alike.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import ConfigError
from .io import sha256_file, write_json
from .pieces import DEFAULT_PROMPT_TEMPLATE, not_utf8, reencode_hint

DEFAULT_MODEL = "smollm2-135m"


def _flag(name: str) -> dict:
    return {"flag": name}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Which knowledge pieces to score and how their prompts read."""

    pieces: Optional[Path] = Field(default=None, json_schema_extra=_flag("--data"), description=(
        "pieces.jsonl (from `gradcouple download`); none: `gradcouple run` takes the bundled real samples"))
    limit: Optional[int] = Field(default=None, ge=1, json_schema_extra=_flag("--limit"),
                                 description="Use only the first N pieces")
    prompt_template: str = Field(default=DEFAULT_PROMPT_TEMPLATE, json_schema_extra=_flag("--prompt-template"),
                                 description="How question pieces are asked; must contain {question}")

    @field_validator("prompt_template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("must contain the placeholder {question}")
        return v


class ModelConfig(_Section):
    """The causal LM and the layers whose weights define theta."""

    name: str = Field(default=DEFAULT_MODEL, json_schema_extra=_flag("--model"), description=(
        "Hub id, local directory, .gguf file, or alias: smollm2-135m (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to "
        "float32), gemma3-270m, gpt2-tiny-random, llama-tiny-random"))
    revision: Optional[str] = Field(default=None, json_schema_extra=_flag("--revision"),
                                    description="Hub revision (branch, tag or commit)")
    layers: str = Field(default="last4", json_schema_extra=_flag("--layers"), description=(
        "Target blocks: 'last4', 'lastN', 'all', a range '26-29', a list '0,5,11', or a module-name regex 're:...'"))
    module: Optional[str] = Field(default=None, json_schema_extra=_flag("--module"), description=(
        "Module inside each block, e.g. 'mlp.down_proj'; none: the architecture's MLP output projection"))
    device: str = Field(default="auto", json_schema_extra=_flag("--device"), description=(
        "cpu, cuda, cuda:N, mps, auto, or auto-map (a model larger than one GPU spread over every GPU)"))
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", json_schema_extra=_flag("--dtype"), description=(
        "Compute dtype of the weights, on every device (checked there first; on GPU 16-bit products accumulate in fp32)"))
    threads: Optional[int] = Field(default=None, ge=1, json_schema_extra=_flag("--threads"), description=(
        "torch CPU threads (none: torch's default, which follows OMP_NUM_THREADS); 1 when other processes share the cores"))


class ExtractConfig(_Section):
    """Per-example gradient extraction into fp16 shards."""

    store: Literal["factors", "dense", "projected"] = Field(default="factors", json_schema_extra=_flag("--store"),
                                                             description="factors (exact), dense (exact) or projected")
    batch_size: int = Field(default=16, ge=1, json_schema_extra=_flag("--batch-size"),
                            description="Pieces per forward/backward (halved on CUDA out-of-memory)")
    shard_size: int = Field(default=64, ge=1, json_schema_extra=_flag("--shard-size"),
                            description="Pieces per shard file, the unit of resume")
    proj_dim: int = Field(default=4, ge=1, json_schema_extra=_flag("--proj-dim"),
                          description="k_in = k_out of each Kronecker sketch (--store projected)")
    proj_blocks: int = Field(default=256, ge=1, json_schema_extra=_flag("--proj-blocks"), description=(
        "Independent k x k sketches per target (--store projected): blocks * k^2 numbers"))
    seed: int = Field(default=0, description="Projection seed")
    max_length: int = Field(default=256, ge=4, json_schema_extra=_flag("--max-length"), description=(
        "Token limit of prompt+answer; longer prompts are cut from the left"))


class CoupleConfig(_Section):
    """Gram / cosine (GradSim) computation."""

    block_size: int = Field(default=256, ge=1, json_schema_extra=_flag("--block-size"),
                            description="Pieces per block of the blocked all-pairs product")
    top_k: Optional[int] = Field(default=None, ge=1, json_schema_extra=_flag("--top-k"),
                                 description="Keep the K most similar pieces per piece instead of N x N")
    max_memory: Optional[float] = Field(default=None, gt=0, json_schema_extra=_flag("--max-memory"), description=(
        "Memory bound in GiB (none: a quarter of RAM); a full N x N matrix over it is refused: pass --top-k"))
    top_pairs: int = Field(default=50, ge=1, json_schema_extra=_flag("--top-pairs"),
                           description="Rows of pairs.csv and pairs_different_answer.csv")
    thresholds: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7],
                                    description="Cosine thresholds counted in stats.json")
    method: Literal["auto", "factored", "dense"] = Field(default="auto", json_schema_extra=_flag("--method"),
                                                         description="Gram algorithm: auto, factored or dense (factors store)")
    layers: Optional[str] = Field(default=None, json_schema_extra=_flag("--couple-layers"), description=(
        "Blocks GradSim is computed over, among the extracted ones (e.g. 26-29); none: every extracted layer. "
        "`run --method` sets it when it extracts the edited blocks too"))


class RippleConfig(_Section):
    """Real edits and their measured ripple effect."""

    edits: Literal["auto", "benchmark", "pieces"] = Field(default="auto", json_schema_extra=_flag("--edits"), description=(
        "benchmark: the edits and test queries the pieces carry (RippleEdits, MQuAKE); pieces: edit pieces toward "
        "counterfactuals and measure every other piece; auto: benchmark when the pieces carry edits"))
    n_edits: int = Field(default=10, ge=1, json_schema_extra=_flag("--n-edits"),
                         description="How many edits to make, one at a time")
    method: str = Field(default="ft", json_schema_extra=_flag("--method"), description="Edit method")
    hparams: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "Knobs per edit method over the method's defaults, {method: {knob: value}}"))
    hparams_file: Optional[Path] = Field(default=None, json_schema_extra=_flag("--hparams"), description=(
        "Settings of the edit method, YAML or JSON (gradcouple/hparams/<method>/*.yaml, EasyEdit's YAML, ROME's JSON), "
        "over the published settings for the model; knobs given otherwise win"))
    batch_size: int = Field(default=1, ge=1, json_schema_extra=_flag("--batch-size"), description=(
        "Benchmark edits made together, their rewrites as one batch (MEMIT and AlphaEdit write a batch at once, ROME one "
        "rewrite after another); an MQuAKE case's rewrites are always one edit"))
    sequential: bool = Field(default=False, json_schema_extra=_flag("--sequential"), description=(
        "Make the batches one after another without restoring the weights between them, measuring every earlier edit "
        "again after each (how MEMIT and AlphaEdit are used); the weights are restored at the end"))
    full_model: bool = Field(default=False, json_schema_extra=_flag("--full-model"), description=(
        "Run every edit step and measurement through all blocks, and the value optimisation of rome, memit and alphaedit "
        "over whole prompts; by default they run from the lowest edited block on, the residual entering it computed once "
        "per sequence, and the value optimisation from each prompt's lookup token on, the keys and values before it "
        "computed once (the same log-probs to float32 rounding)"))
    layer_sweep: Optional[str] = Field(default=None, json_schema_extra=_flag("--layer-sweep"), description=(
        "Blocks, e.g. 2-12: the method's efficacy, specificity and locality on the benchmark edits with each block as its "
        "first edited layer -> layer_sweep.json (needs no gradients at those blocks)"))
    covariance: Literal["wikipedia", "pieces"] = Field(default="wikipedia", description=(
        "Key covariance of rome and of the whitened-key predictor: layer inputs on the Wikipedia paragraphs bundled "
        "with the package, or on the run's own pieces (factors store)"))
    covariance_tokens: int = Field(default=50_000, ge=256, description="Tokens of Wikipedia text for the key covariance")
    seed: int = Field(default=0, json_schema_extra=_flag("--seed"), description=(
        "Seed of the choice of edited pieces, of substitute counterfactuals and of the shuffled baseline"))
    top_k: int = Field(default=10, ge=1, description="k of precision@k")
    sweep: Optional[list[PositiveFloat]] = Field(default=None, json_schema_extra=_flag("--sweep"), description=(
        "Benchmark edits at several values of one knob, KNOB=v1,v2,... (e.g. lr=1e-4,1e-3 or clamp-norm-factor=1,4); "
        "values alone vary the method's strength knob (ft: lr, rome: clamp_norm_factor) -> RUN/ripple/sweep.json"))
    sweep_knob: Optional[str] = Field(default=None, description=(
        "The knob --sweep varies (set by --sweep KNOB=...); none: the edit method's strength knob"))
    bootstrap_resamples: int = Field(default=1000, ge=10, description=(
        "Resamples of whole edits behind each correlation's interval (benchmark mode)"))

    @model_validator(mode="before")
    @classmethod
    def _legacy_knobs(cls, data):
        """Run directories made before the edit methods were registered kept their knobs flat."""
        if not isinstance(data, dict) or not any(k in data for k in LEGACY_KNOBS):
            return data
        data = dict(data)
        hp = {m: dict(v) for m, v in (data.get("hparams") or {}).items()}
        for old, where in LEGACY_KNOBS.items():
            if old in data:
                value = data.pop(old)
                if value is not None and where is not None:
                    hp.setdefault(where[0], {}).setdefault(where[1], value)
        data["hparams"] = hp
        return data

    @model_validator(mode="before")
    @classmethod
    def _sweep_text(cls, data):
        """``--sweep lr=1e-4,1e-3`` (or values alone) as the knob and the list of values."""
        if isinstance(data, dict) and isinstance(data.get("sweep"), str):
            data = dict(data)
            knob, _, values = data["sweep"].rpartition("=")
            if knob.strip():
                data["sweep_knob"] = knob.strip()
            data["sweep"] = [x.strip() for x in values.split(",") if x.strip()]
        return data



#: knobs kept flat in the ripple section before the registry: old field -> (method, knob), or None for
#: the simplified ROME's index into the target layers, which the block list ``layers`` replaced
LEGACY_KNOBS = {"steps": ("ft", "steps"), "lr": ("ft", "lr"), "max_delta": ("ft", "max_delta"),
                "early_stop": ("ft", "early_stop"), "rome_layer": None,
                "rome_steps": ("rome", "v_num_grad_steps"), "rome_lr": ("rome", "v_lr"),
                "rome_clamp": ("rome", "clamp_norm_factor")}


class ForecastConfig(_Section):
    """Forecasts of which stored pieces an edit will move, before it is made."""

    predictors: list[Literal["first_order", "gradsim", "inner_product"]] = Field(
        default_factory=lambda: ["first_order"], json_schema_extra=_flag("--predictor"), description=(
            "first_order (<g_j, Δθ> for the weight change --method computes, not kept), gradsim or inner_product (with "
            "the gradient of the edit's new target; no edit computed); several comma-separated"))
    top_k: int = Field(default=10, ge=1, json_schema_extra=_flag("--top-k"),
                       description="Pieces listed per edit and predictor, and the k of --verify's statistics")
    verify: Optional[int] = Field(default=None, ge=1, json_schema_extra=_flag("--verify"), description=(
        "Make each edit for real (weights restored after) and measure every predictor's top K pieces, an equal random "
        "sample of the rest and its own tests -> forecast/summary.json (all three predictors are scored then); off "
        "unless given, and --verify alone means K = 10"))
    precision: Literal["float32", "float64"] = Field(default="float32", json_schema_extra=_flag("--precision"), description=(
        "Products of the stored gradients with the edit's direction (sums are float64 either way)"))

    @field_validator("predictors", mode="before")
    @classmethod
    def _comma_list(cls, v):
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v


class ReportConfig(_Section):
    """HTML report."""

    max_heatmap: int = Field(default=200, ge=2, json_schema_extra=_flag("--max-heatmap"),
                             description="Largest number of pieces drawn in the heatmap")


@dataclass(frozen=True)
class GivenField:
    """A setting given now: its name as the user wrote it (a flag, or a config file's field), the
    value, and the config file it came from (None: a flag or keyword)."""

    name: str
    value: Any
    source: Optional[str] = None


@dataclass
class Given:
    """What a stage was given now, for the cross-field rules of :class:`RunConfig` (its validation context).

    ``fields``: dotted field -> :class:`GivenField`; a config file's settings count as given, like
    the same flags, and a method knob given by its flag is ``ripple.hparams.*.<knob>`` (whichever
    method is chosen). ``extracted``: the settings of the run's extraction, the pieces file it
    records with its sha256, and its target names (stages that read one). ``methods``: edit method
    -> (knob -> flag, the knob --sweep varies). ``benchmark``: whether the run's pieces carry
    benchmark edits. ``options``: a stage's flags that are not config fields (``run``'s --datasets
    and --no-ripple).
    """

    stage: str
    fields: dict[str, GivenField] = field(default_factory=dict)
    run_dir: Optional[Path] = None
    extracted: Optional["RunConfig"] = None
    extracted_pieces: Optional[tuple[str, str]] = None
    extracted_names: list[str] = field(default_factory=list)
    methods: dict[str, tuple[dict[str, str], str]] = field(default_factory=dict)
    benchmark: Optional[bool] = None
    options: dict[str, Any] = field(default_factory=dict)
    cuda: bool = False

    def flag(self, dotted: str) -> str:
        """The name the user gave field ``dotted`` by (its flag, or the field itself in a config file)."""
        return self.fields[dotted].name

    def label(self, dotted: str) -> Optional[str]:
        """How the user gave field ``dotted``: ``--layers all`` or ``--layers all (in cfg.yaml)``; None when not given."""
        f = self.fields.get(dotted)
        if f is None:
            return None
        return f"{f.name} {_shown(f.value)}" + (f" (in {f.source})" if f.source else "")

    def value(self, dotted: str) -> Any:
        return self.fields[dotted].value if dotted in self.fields else None


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def _refuse(message: str):
    raise PydanticCustomError("gradcouple_rule", message)


class RunConfig(_Section):
    """Every stage's settings. ``extract_hash`` covers exactly what changes the gradients."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    couple: CoupleConfig = Field(default_factory=CoupleConfig)
    ripple: RippleConfig = Field(default_factory=RippleConfig)
    forecast: ForecastConfig = Field(default_factory=ForecastConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _given_rules(self, info: ValidationInfo) -> "RunConfig":
        """Refuse what a stage could not honour (one line naming the flag and the fix). Runs only
        when validated with a :class:`Given` context (``context={"given": ...}``)."""
        given = (info.context or {}).get("given") if info else None
        if isinstance(given, Given):
            for rule in GIVEN_RULES:
                rule(self, given)
        return self

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
        d = self.couple.model_dump(mode="json", include={"top_k", "top_pairs", "thresholds", "method", "layers"})
        if d["layers"] is None:
            d.pop("layers")  # coupling made before the setting existed stays current
        return self._hash(d)

    def ripple_hash(self) -> str:
        """sha256 (16 hex) of the ripple settings but the methods' knobs (the edit method's resolved
        knobs are an input of their own, so another method's knobs change nothing)."""
        return self._hash(self.ripple.model_dump(mode="json", exclude={"hparams", "hparams_file", "full_model"}))

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as JSON (atomic)."""
        write_json(path, self.model_dump(mode="json"))


# ----------------------------------------------------------------------------- the cross-field rules


def _sketch_sizes(cfg: RunConfig, g: Given) -> None:
    for f in ("extract.proj_dim", "extract.proj_blocks"):
        if (label := g.label(f)) and cfg.extract.store != "projected":
            flag = g.flag(f)
            _refuse(f"{label}: sizes the sketches of --store projected, and the store here is {cfg.extract.store}; "
                    f"drop {flag} or pass --store projected.")


def _couple_reads_the_extraction(cfg: RunConfig, g: Given) -> None:
    """couple --run without --model computes from the extraction as it is: settings that would change
    the gradients are refused when they differ from the extraction's, and so is a device it cannot use."""
    if g.stage != "couple" or g.extracted is None:
        return
    if "model.name" in g.fields and g.fields["model.name"].source is None:
        return  # couple --model: the extraction it needs is made (or found) first
    was, root = g.extracted, g.run_dir
    layers = g.value("model.layers")
    if layers is not None and str(layers) != was.model.layers:
        names = g.extracted_names
        span = names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}" if names else "?"
        _refuse(f"{g.label('model.layers')}: the gradients in {root} were extracted for layers {was.model.layers} "
                f"({len(names)} targets: {span}); rerun `gradcouple extract --out {root} --layers {layers} --overwrite` "
                f"(or `gradcouple couple --model {was.model.name} --data {_pieces_file(g)} --layers {layers}`, which "
                f"extracts them in a run directory of its own), or drop --layers.")
    data = g.value("data.pieces")
    if data is not None:
        path = Path(str(data))
        if not path.is_file():
            _refuse(f"{g.label('data.pieces')}: no such file; the gradients in {root} were extracted from "
                    f"{_pieces_file(g)}, which couple --run uses without --data.")
        if g.extracted_pieces and sha256_file(path) != g.extracted_pieces[1]:
            _refuse(f"{g.label('data.pieces')}: the gradients in {root} were extracted from other pieces "
                    f"({_pieces_file(g)}); rerun `gradcouple extract --data {path} --out {root} --overwrite` (or "
                    f"`gradcouple couple --model {was.model.name} --data {path}`, which extracts them in a run directory "
                    f"of its own), or drop --data.")
    for dotted in sorted(g.fields):
        section, _, name = dotted.partition(".")
        if section not in ("data", "model", "extract") or dotted in ("data.pieces", "model.layers", "model.device",
                                                                    "model.threads", "extract.batch_size"):
            continue
        now, then = getattr(getattr(cfg, section), name), getattr(getattr(was, section), name)
        if now != then:
            flag = g.flag(dotted)
            _refuse(f"{g.label(dotted)}: the gradients in {root} were extracted with {flag} {_shown(then)}; rerun "
                    f"`gradcouple extract --out {root} {flag} {_shown(now)} --overwrite`, or drop {flag}.")
    device = g.value("model.device")
    if device is not None and device not in ("cpu", "auto"):
        if str(device).startswith("cuda"):
            if not g.cuda:
                _refuse(f"{g.label('model.device')}: CUDA is not available on this machine, so couple computes GradSim "
                        f"on the CPU from the gradients stored in {root}. Drop --device.")
            return
        _refuse(f"{g.label('model.device')}: couple computes GradSim on the CPU (or a CUDA GPU, --device cuda) from the "
                f"gradients stored in {root}; --device {device} applies only with --model, when couple extracts first. "
                f"Drop --device.")


def _pieces_file(g: Given) -> str:
    return g.extracted_pieces[0] if g.extracted_pieces else "its pieces"


def _method_knobs(cfg: RunConfig, g: Given) -> None:
    """A knob flag of another edit method than the one these edits use; the knob --sweep varies."""
    if not g.methods or g.stage not in ("ripple", "run"):
        return
    method = cfg.ripple.method
    if method not in g.methods:
        label = g.label("ripple.method") or f"ripple.method {method}"
        _refuse(f"{label}: not an edit method; use one of {', '.join(g.methods)}.")
    knobs, strength = g.methods[method]
    for dotted in g.fields:
        if not dotted.startswith("ripple.hparams.*."):  # a knob given by its flag, for whichever method is chosen
            continue
        knob, name = dotted.rsplit(".", 1)[1], g.flag(dotted)
        if knob not in knobs:
            owner = next(m for m, (k, _) in g.methods.items() if knob in k)
            mine = ", ".join(f for f in knobs.values() if f) or "none"
            _refuse(f"{g.label(dotted)}: applies to --method {owner}, and these edits are {method} (whose knobs "
                    f"are {mine}); drop {name} or pass --method {owner}.")
    sweep = g.value("ripple.sweep")
    if sweep is None:
        return
    swept_knob = strength
    if cfg.ripple.sweep_knob is not None:
        swept_knob = canonical_knob(cfg.ripple.sweep_knob, knobs)
        if swept_knob is None:
            names = ", ".join(f"{k} ({f})" if f else k for k, f in knobs.items())
            _refuse(f"{g.label('ripple.sweep')}: {cfg.ripple.sweep_knob} is not a knob of {method} edits, whose knobs "
                    f"are {names}; name one of them, or pass --method.")
    swept = f"ripple.hparams.*.{swept_knob}"
    if swept in g.fields:
        flag = g.flag(swept)
        _refuse(f"{g.label(swept)}: --sweep {_shown(sweep)} sets {flag} of every {method} edit, one strength after "
                f"another; drop {flag} or --sweep.")
    if g.benchmark is False or g.value("ripple.edits") == "pieces":
        why = "--edits pieces was given" if g.value("ripple.edits") == "pieces" else \
            f"the pieces in {g.run_dir} carry no benchmark edit"
        _refuse(f"{g.label('ripple.sweep')}: a sweep repeats the benchmark's edits (RippleEdits, MQuAKE) at each "
                f"strength, but {why}; drop --sweep, or run ripple on benchmark pieces.")


def canonical_knob(name: str, knobs: dict[str, str]) -> Optional[str]:
    """The knob of ``knobs`` (knob -> flag) that ``name`` names: the knob itself or its flag, with or
    without dashes, '-' and '_' alike; None when it names none."""
    key = name.strip().lstrip("-").replace("-", "_")
    return next((k for k, f in knobs.items() if key in (k, f.lstrip("-").replace("-", "_"))), None)


def _run_options(cfg: RunConfig, g: Given) -> None:
    if g.stage != "run":
        return
    datasets = g.options.get("datasets")
    if datasets and "data.pieces" in g.fields:
        _refuse(f"--datasets {_shown(datasets)}: the bundled samples are read only without --data, and "
                f"{g.label('data.pieces')} was given; drop --datasets or --data.")
    if g.options.get("no_ripple"):
        for dotted in sorted(g.fields, key=g.flag):
            if dotted.startswith("ripple."):
                flag = g.flag(dotted)
                _refuse(f"{g.label(dotted)}: --no-ripple skips the ripple stage that {flag} sets up; drop {flag} or "
                        f"--no-ripple.")


def _covariance_needs_inputs(cfg: RunConfig, g: Given) -> None:
    """The 'pieces' key covariance reads stored layer inputs: the factors store only."""
    if g.stage not in ("ripple", "run") or cfg.ripple.covariance != "pieces" or g.options.get("no_ripple"):
        return
    store = (g.extracted or cfg).extract.store if g.stage == "ripple" else cfg.extract.store
    if store != "factors":
        label = g.label("ripple.covariance") or "ripple.covariance pieces"
        fix = "drop --store " + store if g.stage == "run" and "extract.store" in g.fields else \
            "extract again with --store factors"
        _refuse(f"{label}: the key covariance of the run's own pieces reads the layer inputs that only --store factors "
                f"keeps, and the store is {store}; {fix}, or use the Wikipedia covariance.")


def _benchmark_only(cfg: RunConfig, g: Given) -> None:
    """Batches, sequences and layer sweeps are made of the benchmark's edits, and exclude each other with --sweep."""
    if g.stage not in ("ripple", "run"):
        return
    given = [f for f in ("ripple.batch_size", "ripple.sequential", "ripple.layer_sweep") if f in g.fields]
    if given and (g.benchmark is False or g.value("ripple.edits") == "pieces"):
        why = "--edits pieces was given" if g.value("ripple.edits") == "pieces" else \
            f"the pieces in {g.run_dir} carry no benchmark edit"
        _refuse(f"{g.label(given[0])}: batches, sequences and layer sweeps are made of the benchmark's edits "
                f"(RippleEdits, MQuAKE), but {why}; drop {g.flag(given[0])}.")
    for a, b in (("ripple.layer_sweep", "ripple.sweep"), ("ripple.layer_sweep", "ripple.sequential"),
                 ("ripple.layer_sweep", "ripple.batch_size"), ("ripple.sweep", "ripple.sequential")):
        if a in g.fields and b in g.fields:
            _refuse(f"{g.label(a)}: and {g.flag(b)} were both given, and each is a run of its own; drop one.")


GIVEN_RULES = (_sketch_sizes, _couple_reads_the_extraction, _method_knobs, _run_options, _covariance_needs_inputs,
               _benchmark_only)


# ----------------------------------------------------------------------------- loading


def flag_names() -> dict[str, str]:
    """``"section.field" -> "--flag"``, read from each field's ``json_schema_extra``: the one flag map."""
    out = {}
    for section, info in RunConfig.model_fields.items():
        for name, f in info.annotation.model_fields.items():
            extra = f.json_schema_extra or {}
            if "flag" in extra:
                out[f"{section}.{name}"] = extra["flag"]
    return out


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a YAML or JSON config file.

    Raises:
        ConfigError: unreadable, not UTF-8 (the message names the byte offset and line), not YAML,
            or not a mapping; the message names the file.
    """
    try:
        data = Path(path).read_bytes()
        raw = yaml.safe_load(data.decode("utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror}).") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: {not_utf8(e, data)}; {reencode_hint(path)}.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}).") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) or v is None for v in raw.values()):
        raise ConfigError(f"{path}: a config is a mapping with sections data/model/extract/couple/ripple/forecast/report.")
    return raw


def validate_config(raw: dict[str, Any], source: str, given: Optional[Given] = None, check: bool = True) -> RunConfig:
    """``raw`` (sections of fields) as a RunConfig, checked against the rules when ``given`` (and ``check``).

    Raises:
        ConfigError: a rule refused a given setting (its own message), or an invalid field (named
            by its flag when given now, else by ``source`` and the field).
    """
    try:
        return RunConfig.model_validate(raw, context={"given": given} if given and check else None)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "gradcouple_rule":
            raise ConfigError(err["msg"]) from None
        loc = ".".join(str(x) for x in err["loc"])
        named = next((d for d in sorted(given.fields, key=len, reverse=True) if loc == d or loc.startswith(d + ".")),
                     None) if given is not None else None
        if named is not None:  # a list item (forecast.predictors.0) is named by its list's flag
            f = given.fields[named]
            where = f" (in {f.source})" if f.source else ""
            raise ConfigError(f"{f.name} {f.value!r}{where}: {err['msg']}.") from None
        raise ConfigError(f"{source}: field '{loc}': {err['msg']} (got {err.get('input')!r}).") from None


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML or JSON config and apply dotted overrides like ``{"model.name": "gpt2"}``
    (``None`` values are ignored). No rule about what was given is checked here: the resolver does that.

    Raises:
        ConfigError: as :func:`read_config_file` and :func:`validate_config`.
    """
    raw = read_config_file(path) if path is not None else {}
    raw = {k: dict(v or {}) for k, v in raw.items()}
    for key, value in (overrides or {}).items():
        if value is not None:
            section, _, name = key.partition(".")
            raw.setdefault(section, {})[name] = str(value) if isinstance(value, Path) else value
    flags = flag_names()
    given = Given(stage="load", fields={k: GivenField(flags.get(k, k), v) for k, v in (overrides or {}).items()
                                        if v is not None})
    return validate_config(raw, str(path) if path is not None else "flags", given, check=False)


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
