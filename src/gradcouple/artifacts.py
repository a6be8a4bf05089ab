"""Typed models of everything a run directory stores: the gradient manifest and its pieces,
coupling statistics and pairs, ripple edits, measurements and summary. :mod:`gradcouple.rundir`
reads and writes them; stages build them.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ._version import __version__
from .config import RunConfig
from .errors import ArtifactError
from .io import digest
from .metrics import Correlation, Describe, Interval


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), ser_json_inf_nan="constants")


class Inputs(_Model):
    """Fingerprints of what an artifact was computed from: name -> hex digest (or identity string)."""

    values: dict[str, str] = Field(default_factory=dict)


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
    truncated_tokens: int = Field(0, description="Prompt tokens cut from the left to fit extract.max_length")

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
    threads: int = Field(0, description="torch CPU threads (torch.get_num_threads())")
    cpu_count: int = Field(0, description="CPU cores the process may use")
    load_average: Optional[float] = Field(None, description="1-minute load average at the end of the stage; above cpu_count, "
                                                            "other processes were competing for the cores")
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
    processes: int = Field(1, description="Processes that extracted (torchrun's WORLD_SIZE); pieces_per_s is theirs together")


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

    def mismatch(self) -> Optional[str]:
        """How the pieces list disagrees with the shard list, or None when they agree.

        Every shard row is a piece index listed once; the record at that index has that index
        and names that shard; every record lies in a shard, and a complete manifest has one for
        every piece. Catches pieces removed, reordered or duplicated by hand.
        """
        seen: dict[int, int] = {}
        for k, s in enumerate(self.shards):
            for r in s.rows:
                if not 0 <= r < len(self.pieces):
                    return f"{s.file} holds piece {r}, but the pieces list has {len(self.pieces)} entries"
                if r in seen:
                    return f"piece {r} is listed in both {self.shards[seen[r]].file} and {s.file}"
                seen[r] = k
                p = self.pieces[r]
                if p is not None and (p.index != r or p.shard != k):
                    return (f"pieces[{r}] is the record of piece {p.index} ({p.id!r}, shard {p.shard}) where {s.file} "
                            f"(shard {k}) holds piece {r}")
        for i, p in enumerate(self.pieces):
            if p is None and i in seen:
                return f"{self.shards[seen[i]].file} holds piece {i}, which has no record in the pieces list"
            if p is None and self.complete:
                return f"piece {i} has neither a record nor a shard, yet 'complete' is true"
            if p is not None and i not in seen:
                return f"piece {i} ({p.id!r}) is in no shard"
        ids: set[str] = set()
        for p in self.pieces:
            if p is not None:
                if p.id in ids:
                    return f"piece id {p.id!r} appears twice in the pieces list"
                ids.add(p.id)
        return None

    @property
    def order(self) -> list[int]:
        """Store row -> piece index (rows are stored length-sorted)."""
        return [r for s in self.shards for r in s.rows]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def truncation(self) -> tuple[int, int, int]:
        """(pieces whose prompt was cut to max_length, most tokens cut from one, tokens cut in all)."""
        cuts = [p.truncated_tokens for p in self.pieces if p is not None and p.truncated_tokens]
        return len(cuts), max(cuts, default=0), sum(cuts)


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


class PairLayers(_Model):
    """One pair's GradSim split by target layer (``DEFINITIONS['layer contribution']``)."""

    id_a: str
    id_b: str
    cosine: float
    contribution: list[float] = Field(description="Per target, in LayerContributions.names order; sums to cosine up to rounding")


class LayerContributions(_Model):
    """How much of <g_i, g_j> each target layer gives (``DEFINITIONS['layer contribution']``):
    on average over every off-diagonal pair the coupling pass visited, and for the most coupled pairs."""

    names: list[str] = Field(description="Target layers, in manifest order")
    n_pairs: int = Field(description="Off-diagonal pairs averaged over (each unordered pair once)")
    mean_contribution: list[float] = Field(description="Mean signed contribution per target; sums to the mean GradSim")
    mean_abs_contribution: list[float] = Field(description="Mean |contribution| per target")
    abs_share: list[float] = Field(description="mean_abs_contribution normalised to sum to 1 over targets")
    top_pairs: list[PairLayers] = Field(default_factory=list, description="The most coupled pairs of pairs.csv, most coupled first")


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
    layers: Optional[LayerContributions] = Field(None, description="Per-layer parts of the Gram (None: couple ran before they were kept)")


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
    already_satisfied: bool = Field(False, description="The model preferred the new answer before the edit")
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
    target_answer_pieces: int = Field(description="Other pieces whose answer is the new target: measured, not correlated")
    target_answer_mean_rise: Optional[float] = Field(description="Their mean change of log P (nats)")
    restored: bool
    seconds: float


class Measurement(_Model):
    """One line of ripple/edits.jsonl: another piece's predicted and measured change for one edit (nats)."""

    edit: int
    edited_id: str
    piece_id: str
    same_question: bool
    target_answer: bool = Field(description="The piece's answer is the edit's new target (left out of the correlations)")
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
    """``ripple/summary.json`` of the piece-to-piece mode (``ripple --edits pieces``)."""

    mode: Literal["pieces"] = "pieces"
    inputs: Inputs
    method: str
    hparams: dict[str, Any] = Field(description="The edit method's knobs as resolved (its defaults, the config's, the flags')")
    n_edits: int
    n_successful: int
    resumed_edits: int = Field(0, description="Edits read back from the journal of an interrupted earlier run, not recomputed")
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


# ---------------------------------------------------------------- benchmark edits


class CovarianceSource(_Model):
    """Where a key covariance came from: the text, how many tokens, the layer, and the user-cache file
    it is kept in with the sha256 of its tensor (None for one computed from the run's own pieces)."""

    text: str
    n_tokens: int
    layer: str
    file: Optional[str] = None
    sha256: Optional[str] = None


class TestMeasurement(_Model):
    """One line of ripple/tests.jsonl: a test query of an edit, before and after it (nats), and every predictor's score."""

    edit: int
    edit_id: str
    test_id: str
    criterion: str
    logprob_before: float
    logprob_after: float
    rise: float
    greedy_before: bool
    greedy_after: bool
    condition_known: Optional[bool]
    edit_success: bool
    token_accuracy_before: Optional[float] = Field(None, description="Teacher-forced token accuracy of the expected answer before the edit")
    token_accuracy_after: Optional[float] = Field(None, description="... and after it (portability)")
    predictors: dict[str, Optional[float]] = Field(description="Predictor name -> score; None where undefined (no original answer)")


class BenchmarkEditRecord(_Model):
    """One benchmark edit as made: its targets, success, log-probs of the new target (summed over its rewrites, nats)."""

    edit: int
    batch: int = Field(0, description="The first edit of the batch it was made with (itself when edits are made one at a time)")
    edit_ids: list[str]
    question_id: str
    subject: Optional[str]
    new_target: str
    true_target: Optional[str]
    success: bool
    already_satisfied: bool = Field(False, description="The model preferred the new target before the edit (left out of efficacy)")
    same_target: bool = Field(False, description="The new target is the true one (left out of efficacy)")
    logprob_new_before: float
    logprob_new_after: float
    logprob_true_before: Optional[float] = None
    logprob_true_after: Optional[float]
    subject_key_found: bool
    edit_norm: float
    n_tests: int
    mean_rise_own_tests: float
    restored: bool
    seconds: float
    phases: Optional[dict[str, float]] = Field(None, description=(
        "Seconds of this edit per phase: edit (making it), measure (its tests, originals, the unrelated sample and "
        "their greedy checks), predictors (every predictor's scores); a batch's edit and measure shared evenly"))


class SuffixReport(_Model):
    """What suffix execution did (:mod:`gradcouple.suffix`; a summary's ``suffix``): from which block (None:
    the whole model), prefix tokens computed and the seconds it took, scored rows whose residual was
    computed or reused, calls served from the suffix or run whole, rows dropped by the memory bound, and
    times a changed weight below the block emptied the cache."""

    from_block: Optional[int] = None
    prefix_tokens: int = 0
    prefix_seconds: float = 0.0
    rows_computed: int = 0
    rows_reused: int = 0
    suffix_calls: int = 0
    full_calls: int = 0
    evicted: int = 0
    invalidated: int = 0

    def since(self, earlier: "SuffixReport") -> "SuffixReport":
        """What was done after ``earlier`` (a copy of this report taken then)."""
        counts = {k: getattr(self, k) - getattr(earlier, k) for k in type(self).model_fields if k != "from_block"}
        return SuffixReport(from_block=self.from_block, **counts)


class PredictorScore(_Model):
    """How well one predictor tracks the measured rise over a set of (edit, test) points."""

    pearson: Correlation
    spearman: Correlation
    auroc: Optional[float]
    within_edit_spearman: Interval


class PredictorReport(_Model):
    """One predictor: pooled over criteria, per criterion, and pooled over tests whose condition the model knew."""

    definition: str
    pooled: PredictorScore
    criteria: dict[str, PredictorScore]
    pooled_condition_known: PredictorScore


class ExactMatch(_Model):
    """Fraction of counted tests whose expected answer is the greedy continuation, before and after the edit."""

    n: int
    before: Optional[float]
    after: Optional[float]


class RetentionPoint(_Model):
    """In a sequence of edits (``ripple --sequential``), after ``n_edits_made`` of them: how many still hold."""

    n_edits_made: int
    n_counted: int = Field(description="Of them, the edits not already satisfied")
    efficacy: Optional[float] = Field(description="Fraction of the counted edits that are still an edit success")
    exact_match_tests: Optional[float] = Field(description="Greedy exact match of every test query of the edits made")


class EditMetrics(_Model):
    """The edit metrics the field reports, each as ``metrics.DEFINITIONS`` defines it under its name."""

    n_edits: int
    n_already_satisfied: int = Field(description="Edits the model satisfied before they were made (reported apart)")
    n_same_target: int = Field(0, description="Edits whose new target is the true one (reported apart)")
    n_counted: int = Field(description="Edits neither already satisfied nor of the same target: the ones efficacy is over")
    n_successful_counted: int
    efficacy: Optional[float] = Field(description="n_successful_counted / n_counted")
    efficacy_magnitude: Describe = Field(description="Rise of log P(new target), nats, over the counted edits")
    generalisation: Optional[float]
    n_rephrasings: int = Field(description="Rephrasing test queries generalisation is over")
    specificity: Describe = Field(description="Change of log P of other edits' test queries, nats")
    locality: Describe = Field(description="Token-accuracy locality of other edits' test queries")
    portability: dict[str, Optional[float]] = Field(description="Criterion (and 'pooled') -> mean teacher-forced token "
                                                    "accuracy of successful edits' test queries after the edit")
    exact_match_after: dict[str, Optional[float]] = Field(description="Criterion (and 'pooled') -> greedy exact match of "
                                                          "the same test queries after the edit")


class BenchmarkSummary(_Model):
    """``ripple/summary.json`` of the benchmark mode (``ripple --edits benchmark``)."""

    mode: Literal["benchmark"] = "benchmark"
    inputs: Inputs
    method: str
    hparams: dict[str, Any] = Field(description="The edit method's knobs as resolved (its defaults, the config's, the flags')")
    settings: dict[str, Any] = Field(description="The ripple section of the config, but the methods' knobs")
    layer: str = Field(description="The layer whose keys the activation and whitened-key predictors use (and rome edits)")
    covariance: CovarianceSource
    n_edits: int
    n_successful: int
    n_tests: int
    n_tests_counted: int = Field(description="Tests of successful edits: the ones every statistic is computed on")
    resumed_edits: int = Field(0, description="Edits read back from the journal of an interrupted earlier run, not recomputed")
    exact_match: dict[str, ExactMatch]
    multi_hop_accuracy: Optional[float]
    unrelated_change: Describe = Field(description="Change of log P (nats) of a fixed sample of other edits' test queries "
                                                   "(up to 100, seeded): specificity")
    metrics: Optional[EditMetrics] = Field(None, description="Efficacy, generalisation, specificity, locality, portability")
    method_source: Optional[str] = Field(None, description="Where the method's settings came from (a published file, --hparams)")
    retention: list[RetentionPoint] = Field(default_factory=list, description="--sequential: after each batch, the edits made so far")
    suffix: Optional[SuffixReport] = Field(None, description="How the edits and measurements ran: from which block, what was reused")
    predictors: dict[str, PredictorReport]
    definitions: dict[str, str]
    seconds: float
    device: DeviceInfo
    edits: list[BenchmarkEditRecord]


class SweepPoint(_Model):
    """One edit strength of a sweep: efficacy, specificity, and every predictor's pooled correlations."""

    strength: float
    n_edits: int
    n_successful: int
    metrics: Optional[EditMetrics] = None
    mean_rise_own_tests: Describe = Field(description="Over all edits (failed ones included), the mean rise of an edit's own test queries (nats)")
    unrelated_change: Describe
    spearman: dict[str, Correlation]
    pearson: dict[str, Correlation]


class LayerSweepPoint(_Model):
    """The benchmark edits made at one set of blocks: the edit metrics that need no gradients."""

    layers: list[int]
    n_edits: int
    n_already_satisfied: int
    n_same_target: int = 0
    n_counted: int
    n_successful_counted: int
    efficacy: Optional[float]
    efficacy_magnitude: Describe
    specificity: Describe
    locality: Describe
    seconds: float


class LayerSweepSummary(_Model):
    """``layer_sweep.json``: the method's efficacy, specificity and locality with each block as its
    first edited layer (``ripple --layer-sweep``), what a model's published layers are chosen from."""

    inputs: Inputs
    method: str
    hparams: dict[str, Any]
    points: list[LayerSweepPoint]
    definitions: dict[str, str]
    seconds: float
    device: DeviceInfo


class SweepSummary(_Model):
    """``ripple/sweep.json``: one set of benchmark edits at several values of one knob of the edit method."""

    inputs: Inputs
    method: str
    knob: str
    points: list[SweepPoint]
    seconds: float


# ---------------------------------------------------------------- report


# ---------------------------------------------------------------- forecast


class ForecastRow(_Model):
    """One line of ``forecast/forecast.jsonl``: a piece as one predictor ranks it for one edit."""

    edit: str = Field(description="The edit's id (its first rewrite's piece id)")
    predictor: str
    piece_id: str
    source: Literal["store", "file"] = Field(description="store: a piece of the run; file: a test query of the edit's own file")
    prompt: str
    answer: str
    score: float
    rank: int = Field(description="1-based rank by |score| among every piece scored for the edit (the run's and its own tests)")
    own_test: bool = Field(False, description="One of the edit's own test queries")
    criterion: Optional[str] = None
    stable: bool = Field(False, description="A test query whose answer the edit should leave (RULES['stable test'])")
    change: Optional[float] = Field(None, description="--verify: measured change of log P (nats), after minus before the edit")


class ForecastRewrite(_Model):
    prompt: str
    target: str
    subject: Optional[str] = None


class ForecastEdit(_Model):
    """One forecast edit: its rewrites (applied together), own tests, and what it cost (seconds)."""

    id: str
    rewrites: list[ForecastRewrite]
    n_tests: int
    edit_norm: Optional[float] = Field(None, description="|Δθ| of the method's weight change (first_order, --verify)")
    success: Optional[bool] = Field(None, description="--verify: after the edit every rewrite's new target beats its true one "
                                                      "(DEFINITIONS['edit success'])")
    seconds: dict[str, float] = Field(default_factory=dict, description="gradient, edit, scores, verify")


class ForecastCheck(_Model):
    """How one predictor's forecast held up under --verify (DEFINITIONS name each statistic)."""

    spearman: Correlation = Field(description="Pooled Spearman's rho of score and measured change over every measured "
                                              "(edit, piece) pair, clustered bootstrap interval over edits")
    within_edit_spearman: Interval = Field(description="Mean over edits of Spearman's rho within the edit's measured pieces")
    precision_at_k: Interval = Field(description="Mean over edits of precision@k among the measured pieces")
    recall_own_tests: Interval = Field(description="Mean over edits of the fraction of its own test queries that should "
                                                   "change which rank in the top k")
    stable_tests_in_top_k: Interval = Field(description="Mean over edits of the fraction of its own stable test queries "
                                                        "(locality) ranked in the top k: false alarms")
    mean_abs_change_top_k: Optional[float] = Field(None, description="Mean |measured change| (nats) of the predictor's top k")
    mean_abs_change_sample: Optional[float] = Field(None, description="The same over the random sample of the rest")


class ForecastVerify(_Model):
    k: int
    n_edits: int = Field(description="Edits verified")
    n_measured: int = Field(description="(edit, piece) pairs measured: every predictor's top k, an equal random sample of "
                                        "the rest, and the edit's own tests")
    precision_at_k_chance: Optional[float] = Field(None, description="Mean over edits of k / measured pieces: the "
                                                                     "precision@k of a random ranking")
    predictors: dict[str, ForecastCheck]


class ForecastSummary(_Model):
    """``forecast/summary.json``: what was forecast, how, and (--verify) how well."""

    inputs: Inputs
    edits_file: Optional[str] = None
    format: Optional[str] = None
    method: str
    hparams: dict[str, Any]
    method_source: Optional[str] = None
    predictors: list[str]
    top_k: int
    precision: str
    store: str
    exact: bool = Field(description="The store's inner products are exact (factors, dense) rather than estimated (projected)")
    n_pieces: int = Field(description="Stored pieces scored per edit")
    skipped: dict[str, int] = Field(default_factory=dict, description="Records, edits and test queries of the edit "
                                                                     "file left out, by reason")
    resumed_edits: int = 0
    edits: list[ForecastEdit]
    verify: Optional[ForecastVerify] = None
    definitions: dict[str, str]
    seconds: float
    device: DeviceInfo


class GeneratedFile(_Model):
    """One file of the run: its path relative to the run directory and its size in bytes."""

    path: str
    bytes: int


class GeneratedFiles(_Model):
    """Every file of the run when the report was written, the report's own two included."""

    root: str = "."
    n_files: int
    total_bytes: int = Field(description="Bytes of every listed file together")
    files: list[GeneratedFile]


class ReportSummary(BaseModel):
    """``report/summary.json``: the nine sections, each a JSON object (``high_coupling_pairs`` a list of
    pairs.csv rows); log-probs in nats, sizes in bytes, times in seconds, non-finite numbers null."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    metadata: dict[str, Any]
    knowledge_pieces: dict[str, Any]
    gradient_analysis: dict[str, Any]
    coupling_analysis: dict[str, Any]
    high_coupling_pairs: list[PairRow]
    cross_pot_analysis: dict[str, Any]
    generated_files: GeneratedFiles
    gpu_performance: dict[str, Any]
    experiment_readiness: dict[str, Any]
