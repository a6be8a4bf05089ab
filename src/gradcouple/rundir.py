"""The run directory: every path of a run, typed models of what is stored there, and the one
rule that decides whether an artifact is current.

    RUN/pieces.jsonl            the pieces as extracted           (extract)
    RUN/config.json             the resolved RunConfig            (every stage)
    RUN/gradients/              manifest.json, shard-*.pt         (extract)
    RUN/coupling/               gram.pt, cosine.pt | topk.pt, pairs.csv, pairs_different_answer.csv, stats.json (couple)
    RUN/ripple/                 edits.jsonl, summary.json         (ripple)
    RUN/report/                 index.html, summary.json          (report)
    RUN/timing.json             stage wall times of `gradcouple run`

Every artifact records the fingerprints of its inputs (:class:`Inputs`). :func:`stale_inputs`
compares them with the current ones and names each difference; a stage either recomputes or
refuses with that list, never reuses silently. Only this module builds a run path or parses a
stored artifact.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from .config import RunConfig
from .errors import ArtifactError
from .io import atomic_open, atomic_torch_save, sha256_file, write_json
from .metrics import Describe, Interval
from .pieces import KnowledgePiece, read_pieces, write_pieces


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ---------------------------------------------------------------- freshness


class Inputs(_Model):
    """Fingerprints of what an artifact was computed from: name -> hex digest (or identity string)."""

    values: dict[str, str] = Field(default_factory=dict)


INPUT_LABELS = {"pieces": "pieces file (sha256)", "config": "settings (config hash)", "model": "model weights (fingerprint)",
                "gradients": "gradients (manifest fingerprint)", "coupling": "coupling matrix (sha256)"}


def stale_inputs(recorded: Inputs, current: Inputs) -> list[str]:
    """The one freshness rule: every input whose recorded fingerprint differs from the current one.

    Returns human-readable lines ``"pieces file (sha256): 3f2a91c0 -> 77b0e1d4"``; empty when current.
    """
    out = []
    for key in sorted(set(recorded.values) | set(current.values)):
        a, b = recorded.values.get(key), current.values.get(key)
        if a != b:
            out.append(f"{INPUT_LABELS.get(key, key)}: {_short(a)} -> {_short(b)}")
    return out


def _short(x: Optional[str]) -> str:
    return "none" if x is None else (x[:8] if len(x) >= 32 and all(c in "0123456789abcdef" for c in x) else x)


def digest(obj: Any) -> str:
    """sha256 hex of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- gradients


class TargetShape(_Model):
    """One target linear map: y = W x + b with W (d_out, d_in); ``transposed`` for GPT-2 Conv1D."""

    name: str
    d_in: int
    d_out: int
    bias: bool
    transposed: bool = False
    n_params: int

    @property
    def d_in_aug(self) -> int:
        """Input width with the bias column: d_in + bias."""
        return self.d_in + int(self.bias)


class ModelIdentity(_Model):
    """What identifies the weights: alias or id, description, source, revision, file hash, architecture."""

    name: str
    description: str = ""
    source: str = ""
    revision: Optional[str] = None
    file_sha256: Optional[str] = None
    architecture: str = ""
    fingerprint: str = ""


class StoreSettings(_Model):
    """Shard format: kind (factors / dense / projected) and, for projected, the sketch sizes and seed."""

    kind: str
    proj_dim: Optional[int] = None
    proj_blocks: Optional[int] = None
    seed: int = 0


class PieceRecord(_Model):
    """One extracted piece: the exact scored strings, token counts, log-prob (nats), squared gradient norms."""

    index: int
    id: str
    question_id: str
    owners: list[str]
    kind: str
    hop: Optional[int] = None
    prompt: str
    answer: str
    n_prompt_tokens: int
    n_answer_tokens: int
    n_inputs: int
    logprob: float
    sq_norm: dict[str, float]
    shard: int

    @property
    def norm(self) -> float:
        """|g| over all targets."""
        return sum(self.sq_norm.values()) ** 0.5


class ShardEntry(_Model):
    """One shard file: its name, sha256, the piece indices it holds (store order) and its size in bytes."""

    file: str
    sha256: str
    rows: list[int]
    bytes: int


class DeviceInfo(_Model):
    """What ran a computation."""

    device: str
    cpu: str = ""
    threads: int = 0
    torch: str = ""
    gpu: Optional[str] = None
    peak_gpu_memory_bytes: Optional[int] = None


class ExtractTiming(_Model):
    """Wall times in seconds, throughput in pieces/s, peak memory in bytes."""

    seconds: float
    load_seconds: float
    extract_seconds: float
    pieces_per_s: float
    peak_rss_bytes: int
    device: DeviceInfo


class Manifest(_Model):
    """``gradients/manifest.json``: what was extracted, from what, and where each piece lies."""

    format: str = "gradcouple-gradients"
    version: int = 2
    package_version: str = __version__
    inputs: Inputs
    pieces_file: str
    model: ModelIdentity
    targets: list[TargetShape]
    n_params: int
    store: StoreSettings
    dtype: str = "float16"
    compute_dtype: str
    config: dict[str, Any] = Field(description="The data, model and extract sections as extracted")
    batch_size: int = Field(description="Pieces per forward/backward actually used (after any OOM halving)")
    complete: bool = False
    shards: list[ShardEntry] = Field(default_factory=list)
    pieces: list[Optional[PieceRecord]] = Field(default_factory=list)
    timing: Optional[ExtractTiming] = None

    def fingerprint(self) -> str:
        """Digest of what the shards hold: inputs, targets, store settings, every shard's sha256 and rows."""
        return digest([self.inputs.values, [t.model_dump() for t in self.targets], self.store.model_dump(),
                       [(s.sha256, s.rows) for s in self.shards]])

    def records(self) -> list[PieceRecord]:
        """Piece records in pieces.jsonl order.

        Raises:
            ArtifactError: the extraction is incomplete.
        """
        if not self.complete or any(p is None for p in self.pieces):
            raise ArtifactError("the extraction is incomplete; rerun the same `gradcouple extract` command to resume it.")
        return self.pieces  # type: ignore[return-value]

    def settings(self) -> RunConfig:
        """The data, model and extract settings the gradients were extracted with (other sections default)."""
        return RunConfig.model_validate(self.config)

    @property
    def order(self) -> list[int]:
        """Store row -> piece index (rows are stored length-sorted)."""
        return [r for s in self.shards for r in s.rows]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]


# ---------------------------------------------------------------- coupling


class PairRow(_Model):
    """One row of pairs.csv: a pair of pieces and its GradSim."""

    rank: int
    cosine: float
    same_question: bool
    same_answer: bool
    id_a: str
    id_b: str
    question_a: str
    question_b: str
    prompt_a: str
    answer_a: str
    prompt_b: str
    answer_b: str


class PairSplit(_Model):
    """GradSim of the off-diagonal pairs, each unordered pair once, split by the same-question and same-answer rules."""

    all: Describe
    same_question: Describe
    cross_question: Describe
    same_answer: Describe
    different_answer: Describe
    same_question_different_answer: Describe
    cross_question_different_answer: Describe


class CouplingStats(_Model):
    """``coupling/stats.json``."""

    inputs: Inputs
    matrix_sha256: str = Field(description="sha256 of cosine.pt (full) or topk.pt (top-k): what ripple and report check")
    mode: str = Field(description="'full', or 'top<k>' (e.g. 'top10') when only each piece's k nearest are kept")
    n_pieces: int
    pairs: PairSplit
    above: dict[str, int] = Field(default_factory=dict, description="threshold -> pairs with GradSim > threshold")
    abs_above: dict[str, int] = Field(default_factory=dict, description="threshold -> pairs with |GradSim| > threshold")
    note: Optional[str] = None
    store: str
    n_params: int
    methods: dict[str, str]
    block_size: int
    seconds: float
    peak_rss_bytes: int


# ---------------------------------------------------------------- ripple


class EditRecord(_Model):
    """One edit and how well each predictor ranked its measured ripple (log-probs in nats)."""

    edit: int
    piece_id: str
    question_id: str
    kind: str
    prompt: str
    answer: str
    new_answer: str
    counterfactual_source: str
    logprob_true_before: float
    logprob_true_after: float
    logprob_new_before: float
    logprob_new_after: float
    success: bool
    edit_norm: float
    first_order_self: float
    spearman_coupling: Optional[float]
    spearman_first_order: Optional[float]
    pearson_first_order: Optional[float]
    precision_at_k: Optional[float]
    k: int
    mean_abs_measured_same_question: Optional[float]
    mean_abs_measured_cross_question: Optional[float]
    multi_hop_measured: list[float]
    restored: bool
    seconds: float


class Measurement(_Model):
    """One line of ripple/edits.jsonl: another piece's predicted and measured change for one edit (nats)."""

    edit: int
    edited_id: str
    piece_id: str
    same_question: bool
    cosine: float
    predicted_coupling: float
    predicted_first_order: float
    measured: float


class PooledRipple(_Model):
    """Correlations over every (edit, other piece) point at once."""

    spearman_coupling: Optional[float]
    spearman_first_order: Optional[float]
    pearson_first_order: Optional[float]
    n_points: int


class RippleSummary(_Model):
    """``ripple/summary.json``."""

    inputs: Inputs
    method: str
    steps: int
    lr: float
    n_edits: int
    n_successful: int
    seconds: float
    device: DeviceInfo
    spearman_coupling: Interval = Field(description="Mean Spearman's rho of the coupling prediction over edits")
    spearman_first_order: Interval = Field(description="Mean Spearman's rho of the first-order prediction over edits")
    spearman_coupling_successful: Interval = Field(description="As spearman_coupling, successful edits only")
    precision_at_k: Interval
    per_edit: dict[str, Describe]
    pooled: PooledRipple
    baseline_logprob_max_abs_diff_vs_manifest: float
    definitions: dict[str, str]
    edits: list[EditRecord]


# ---------------------------------------------------------------- the directory


def _load_json_model(path: Path, model: type[BaseModel], fix: str):
    try:
        return model.model_validate_json(path.read_bytes())
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror}); {fix}") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "<document>"
        raise ArtifactError(f"{path}: field '{loc}': {err['msg']}; {fix}") from None


class RunDir:
    """Paths and artifacts of one run directory (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # paths
    @property
    def pieces_path(self) -> Path: return self.root / "pieces.jsonl"
    @property
    def config_path(self) -> Path: return self.root / "config.json"
    @property
    def timing_path(self) -> Path: return self.root / "timing.json"
    @property
    def data_dir(self) -> Path: return self.root / "data"
    @property
    def gradients_dir(self) -> Path: return self.root / "gradients"
    @property
    def manifest_path(self) -> Path: return self.gradients_dir / "manifest.json"
    def shard_path(self, k: int) -> Path: return self.gradients_dir / f"shard-{k:05d}.pt"
    def shard_file(self, entry: ShardEntry) -> Path: return self.gradients_dir / entry.file
    @property
    def coupling_dir(self) -> Path: return self.root / "coupling"
    @property
    def gram_path(self) -> Path: return self.coupling_dir / "gram.pt"
    @property
    def cosine_path(self) -> Path: return self.coupling_dir / "cosine.pt"
    @property
    def topk_path(self) -> Path: return self.coupling_dir / "topk.pt"
    @property
    def pairs_path(self) -> Path: return self.coupling_dir / "pairs.csv"
    @property
    def pairs_different_answer_path(self) -> Path: return self.coupling_dir / "pairs_different_answer.csv"
    @property
    def stats_path(self) -> Path: return self.coupling_dir / "stats.json"
    @property
    def ripple_dir(self) -> Path: return self.root / "ripple"
    @property
    def edits_path(self) -> Path: return self.ripple_dir / "edits.jsonl"
    @property
    def ripple_summary_path(self) -> Path: return self.ripple_dir / "summary.json"
    @property
    def report_dir(self) -> Path: return self.root / "report"
    @property
    def index_path(self) -> Path: return self.report_dir / "index.html"
    @property
    def report_summary_path(self) -> Path: return self.report_dir / "summary.json"

    def relative(self, path: Path) -> str:
        """``path`` relative to the run directory, with forward slashes."""
        return Path(path).relative_to(self.root).as_posix()

    def files(self) -> list[tuple[str, int]]:
        """(relative path, bytes) of every finished file of the run, sorted (temp files left out)."""
        return [(self.relative(p), p.stat().st_size) for p in sorted(self.root.rglob("*"))
                if p.is_file() and not p.name.startswith(".")]

    # pieces and config
    def save_pieces(self, pieces: list[KnowledgePiece]) -> None:
        write_pieces(self.pieces_path, pieces)

    def load_pieces(self) -> list[KnowledgePiece]:
        """Raises: DataError (unreadable line), ArtifactError (absent)."""
        if not self.pieces_path.is_file():
            raise ArtifactError(f"{self.pieces_path}: no pieces; run `gradcouple extract --out {self.root}` first.")
        return read_pieces(self.pieces_path)

    def save_config(self, cfg: RunConfig) -> None:
        cfg.save(self.config_path)

    def saved_config_path(self) -> Optional[Path]:
        """config.json when the run has one (the base of flags given to a later stage)."""
        return self.config_path if self.config_path.is_file() else None

    def save_timing(self, seconds: dict[str, float]) -> None:
        write_json(self.timing_path, seconds)

    # gradients
    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def load_manifest(self, complete: bool = True) -> Manifest:
        """The gradient manifest.

        Raises:
            ArtifactError: absent, unreadable, from an older gradcouple, or (with ``complete``) unfinished.
        """
        p = self.manifest_path
        if not p.is_file():
            raise ArtifactError(f"{p}: no gradient manifest; run `gradcouple extract --out {self.root}` first.")
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{p}: not valid JSON ({e}); rerun `gradcouple extract --out {self.root} --overwrite`.") from None
        if raw.get("version") != Manifest.model_fields["version"].default:
            raise ArtifactError(f"{p}: made by another gradcouple version (manifest version {raw.get('version')}); "
                                f"rerun `gradcouple extract --out {self.root} --overwrite`.")
        man = _load_json_model(p, Manifest, f"rerun `gradcouple extract --out {self.root} --overwrite`.")
        if complete and not man.complete:
            raise ArtifactError(f"{p}: extraction is incomplete ({len(man.shards)} shards); "
                                f"rerun the same `gradcouple extract` command to resume it.")
        return man

    def save_manifest(self, manifest: Manifest) -> None:
        write_json(self.manifest_path, manifest.model_dump(mode="json"))

    def clear_gradients(self) -> None:
        import shutil

        shutil.rmtree(self.gradients_dir, ignore_errors=True)

    # coupling
    def save_full_coupling(self, ids: list[str], gram: torch.Tensor, cosine: torch.Tensor) -> str:
        """Write gram.pt and cosine.pt ({"ids", "gram"|"cosine": (N, N) float64}); remove topk.pt. Returns cosine.pt's sha256."""
        atomic_torch_save({"ids": ids, "gram": gram}, self.gram_path)
        atomic_torch_save({"ids": ids, "cosine": cosine}, self.cosine_path)
        self.topk_path.unlink(missing_ok=True)
        return sha256_file(self.cosine_path)

    def save_topk_coupling(self, ids: list[str], indices: torch.Tensor, cosine: torch.Tensor) -> str:
        """Write topk.pt ({"ids", "indices" (N, k) int64, "cosine" (N, k) float32}); remove the full-mode files."""
        atomic_torch_save({"ids": ids, "indices": indices, "cosine": cosine}, self.topk_path)
        for stale in (self.cosine_path, self.gram_path, self.pairs_different_answer_path):
            stale.unlink(missing_ok=True)
        return sha256_file(self.topk_path)

    def matrix_path(self) -> Path:
        """cosine.pt in full mode, topk.pt in top-k mode.

        Raises:
            ArtifactError: neither exists.
        """
        for p in (self.cosine_path, self.topk_path):
            if p.is_file():
                return p
        raise ArtifactError(f"{self.cosine_path}: no coupling matrix (nor topk.pt); run `gradcouple couple --run {self.root}` first.")

    def load_cosine(self) -> tuple[list[str], torch.Tensor]:
        """(ids, (N, N) float64 GradSim) in pieces.jsonl order.

        Raises:
            ArtifactError: not computed yet, or computed in top-k mode.
        """
        if not self.cosine_path.is_file():
            raise ArtifactError(f"{self.cosine_path}: no full coupling matrix; run `gradcouple couple --run {self.root}` "
                                f"(without --top-k) first.")
        d = torch.load(self.cosine_path, weights_only=True, map_location="cpu")
        return list(d["ids"]), d["cosine"].double()

    def load_topk(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(ids, indices (N, k) int64, cosine (N, k) float64)."""
        if not self.topk_path.is_file():
            raise ArtifactError(f"{self.topk_path}: no top-k coupling; run `gradcouple couple --run {self.root} --top-k K`.")
        d = torch.load(self.topk_path, weights_only=True, map_location="cpu")
        return list(d["ids"]), d["indices"].long(), d["cosine"].double()

    def save_pairs(self, rows: list[PairRow], different_answer: bool = False) -> None:
        path = self.pairs_different_answer_path if different_answer else self.pairs_path
        with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(PairRow.model_fields))
            w.writeheader()
            for r in rows:
                w.writerow({**r.model_dump(), "cosine": f"{r.cosine:.6f}"})

    def load_pairs(self, different_answer: bool = False) -> list[PairRow]:
        """Rows of pairs.csv (or pairs_different_answer.csv; [] when that one is absent in top-k mode)."""
        path = self.pairs_different_answer_path if different_answer else self.pairs_path
        if not path.is_file():
            if different_answer:
                return []
            raise ArtifactError(f"{path}: no list of coupled pairs; run `gradcouple couple --run {self.root}` first.")
        with open(path, encoding="utf-8", newline="") as fh:
            try:
                return [PairRow.model_validate({**r, "same_question": r["same_question"] == "True",
                                                "same_answer": r["same_answer"] == "True"}) for r in csv.DictReader(fh)]
            except (ValidationError, KeyError) as e:
                raise ArtifactError(f"{path}: not a pairs table ({e}); rerun `gradcouple couple --run {self.root}`.") from None

    def save_stats(self, stats: CouplingStats) -> None:
        write_json(self.stats_path, stats.model_dump(mode="json"))

    def load_stats(self) -> CouplingStats:
        if not self.stats_path.is_file():
            raise ArtifactError(f"{self.stats_path}: no coupling statistics; run `gradcouple couple --run {self.root}` first.")
        return _load_json_model(self.stats_path, CouplingStats, f"rerun `gradcouple couple --run {self.root}`.")

    # ripple
    def save_ripple(self, summary: RippleSummary, measurements: list[Measurement]) -> None:
        with atomic_open(self.edits_path, "w", encoding="utf-8") as fh:
            for m in measurements:
                fh.write(m.model_dump_json() + "\n")
        write_json(self.ripple_summary_path, summary.model_dump(mode="json"))

    def has_ripple(self) -> bool:
        return self.ripple_summary_path.is_file()

    def load_ripple(self) -> tuple[RippleSummary, list[Measurement]]:
        fix = f"rerun `gradcouple ripple --run {self.root}`."
        summary = _load_json_model(self.ripple_summary_path, RippleSummary, fix)
        rows = []
        if self.edits_path.is_file():
            for n, line in enumerate(self.edits_path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(Measurement.model_validate_json(line))
                    except ValidationError as e:
                        raise ArtifactError(f"{self.edits_path}:{n}: {e.errors()[0]['msg']}; {fix}") from None
        return summary, rows

    # freshness of the downstream artifacts
    def coupling_inputs(self, manifest: Manifest, cfg: RunConfig) -> Inputs:
        """What the coupling of this run must have been computed from now."""
        return Inputs(values={"gradients": manifest.fingerprint(), "config": cfg.couple_hash()})

    def current_stats(self, manifest: Manifest) -> CouplingStats:
        """The coupling statistics, checked against the gradients and the matrix file on disk.

        Raises:
            ArtifactError: absent, or computed from other gradients, or the matrix file was replaced;
                the message names what changed and the command that recomputes it.
        """
        stats = self.load_stats()
        changed = stale_inputs(Inputs(values={"gradients": stats.inputs.values.get("gradients", "")}),
                               Inputs(values={"gradients": manifest.fingerprint()}))
        path = self.matrix_path()
        if sha256_file(path) != stats.matrix_sha256:
            changed.append(f"{INPUT_LABELS['coupling']}: {self.relative(path)} differs from the one stats.json records")
        if changed:
            raise ArtifactError(f"{self.stats_path}: stale coupling ({'; '.join(changed)}); "
                                f"rerun `gradcouple couple --run {self.root}`.")
        return stats

    def ripple_inputs(self, manifest: Manifest, stats: CouplingStats, cfg: RunConfig) -> Inputs:
        return Inputs(values={"gradients": manifest.fingerprint(), "coupling": stats.matrix_sha256,
                              "config": cfg.ripple_hash()})

    def current_ripple(self, manifest: Manifest, stats: CouplingStats) -> Optional[tuple[RippleSummary, list[Measurement]]]:
        """The ripple results when present and made from this run's gradients and coupling; None when absent.

        Raises:
            ArtifactError: present but stale (the message names what changed).
        """
        if not self.has_ripple():
            return None
        summary, rows = self.load_ripple()
        now = Inputs(values={"gradients": manifest.fingerprint(), "coupling": stats.matrix_sha256})
        was = Inputs(values={k: v for k, v in summary.inputs.values.items() if k in now.values})
        changed = stale_inputs(was, now)
        if changed:
            raise ArtifactError(f"{self.ripple_summary_path}: stale ripple results ({'; '.join(changed)}); rerun "
                                f"`gradcouple ripple --run {self.root}` or delete {self.ripple_dir}.")
        return summary, rows

    def check_pieces_match(self, ids: list[str], what: Path) -> None:
        """Raises ArtifactError when ``ids`` (of ``what``) are not the run's pieces in order."""
        if ids != [p.id for p in self.load_pieces()]:
            raise ArtifactError(f"{what} does not match {self.pieces_path}; rerun `gradcouple couple --run {self.root}`.")


def default_run_dir(model: str, cfg: RunConfig) -> Path:
    """``runs/<model>-<extraction hash>``: where ``couple --model`` works when no run directory is given."""
    import re

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")
    return Path("runs") / f"{slug}-{cfg.extract_hash()[:8]}"


def load_data_pieces(cfg: RunConfig) -> list[KnowledgePiece]:
    """The first ``data.limit`` pieces of ``data.pieces``.

    Raises:
        ConfigError: no pieces file configured.
        DataError: unreadable pieces file.
    """
    from .errors import ConfigError

    if cfg.data.pieces is None:
        raise ConfigError("no pieces file: pass --data PIECES.jsonl (make one with `gradcouple download`).")
    pieces = read_pieces(cfg.data.pieces)
    return pieces[: cfg.data.limit] if cfg.data.limit else pieces


__all__ = ["RunDir", "Inputs", "stale_inputs", "digest", "Manifest", "PieceRecord", "ShardEntry", "TargetShape",
           "ModelIdentity", "StoreSettings", "DeviceInfo", "ExtractTiming", "CouplingStats", "PairSplit", "PairRow",
           "RippleSummary", "EditRecord", "Measurement", "PooledRipple", "load_data_pieces", "default_run_dir"]
