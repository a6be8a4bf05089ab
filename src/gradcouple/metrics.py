"""Every statistic gradcouple reports, defined once: summaries, rank and linear correlation,
precision@k and bootstrap intervals (scipy.stats). :data:`DEFINITIONS` is the text the docs,
``ripple/summary.json`` and the report quote.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from pydantic import BaseModel
from scipy import stats as sstats

from .rules import RULES

CONFIDENCE = 0.95
N_RESAMPLES = 2000

DEFINITIONS: dict[str, str] = {
    "log P(answer | prompt)": "Sum over all answer tokens of the log-probability the model gives each token after the "
                              "prompt and the preceding answer tokens, in nats (natural log).",
    "GradSim": "The cosine of two pieces' gradients of log P(answer | prompt) with respect to the target layers' "
               "weights and biases θ: GradSim(i, j) = ⟨g_i, g_j⟩ / (|g_i| |g_j|), from −1 to 1; 0 when a gradient is zero.",
    **RULES,
    "layer contribution": "The part of GradSim(i, j) from one target layer l: ⟨g_i, g_j⟩_l / (|g_i| |g_j|), where "
                          "⟨·,·⟩_l sums over that layer's weights and biases only; the target layers' contributions add "
                          "up to GradSim(i, j). Averaged over all off-diagonal pairs (each unordered pair once) it is "
                          "signed, and adds up to the mean GradSim; a layer's absolute share is its mean |contribution| "
                          "divided by the sum of the layers' mean |contribution|.",
    "ripple effect": "An edit changes θ by Δθ so that the edited piece answers a counterfactual; the ripple on another "
                     "piece j is its measured change of log P(answer | prompt) in nats (after minus before).",
    "coupling prediction": "⟨g_i, Δθ⟩ · GradSim(i, j) · |g_j| / |g_i|: the part of the edit along the edited piece's "
                           "gradient g_i, carried to piece j by coupling and norms alone.",
    "first-order prediction": "⟨g_j, Δθ⟩: the first-order Taylor estimate of piece j's change of log P for the edit's "
                              "actual weight change Δθ, in nats.",
    "edit success": "After the edit, log P(new answer | prompt) > log P(true answer | prompt) for the edited piece "
                    "(for every rewrite of a benchmark edit; a rewrite without a true answer must rise).",
    "already satisfied": "Before the edit, log P(new answer | prompt) > log P(true answer | prompt) for every rewrite: "
                         "the model preferred the new answer already, so the edit's success shows nothing; such edits "
                         "are counted apart and left out of efficacy.",
    "same target": "Every rewrite's new answer is its true answer under the same-answer rule (a defect of the "
                   "benchmark's data): no edit at all, so it is counted apart and left out of efficacy.",
    "efficacy": "Of the edits neither already satisfied nor of the same target, the fraction that are an edit success "
                "(ROME's efficacy score, EasyEdit's reliability, measured as a log-probability comparison).",
    "efficacy magnitude": "Rise of log P(new answer | prompt) from before to after the edit, in nats, over the edits "
                          "efficacy counts.",
    "generalisation": "Of the test queries that rephrase the edited fact (RippleEdits' Subject_Aliasing, CounterFact's "
                      "paraphrases) of successful edits, the fraction that are an exact match for the new answer after "
                      "the edit; undefined when the benchmark gives no rephrasing.",
    "specificity": "Change of log P(answer | prompt) in nats, after minus before the edit, of a fixed sample of other "
                   "edits' test queries (up to 100, seeded): zero when the edit leaves unrelated facts alone.",
    "locality": "EasyEdit's token-accuracy locality: over the same sample of other edits' test queries, the fraction "
                "of answer positions whose argmax token, given the prompt and the answer tokens before it, is the same "
                "after the edit as before.",
    "teacher-forced token accuracy": "The fraction of answer tokens that are the model's argmax given the prompt and "
                                     "the answer tokens before it (EasyEdit's accuracy); 1 for an exact match, and "
                                     "often high where exact match is not, since each token is given its prefix.",
    "portability": "Teacher-forced token accuracy of the test queries' expected answers after the edit, per "
                   "RippleEdits criterion (EasyEdit's portability), over successful edits.",
    "describe": "n, mean, sample standard deviation (ddof 1; 0 for one value), min, median and max of the finite values.",
    "Spearman's rho": "Pearson correlation of the ranks of predicted and measured changes (scipy.stats.spearmanr), "
                      "from −1 to 1; undefined (null) for fewer than 3 points or a constant input.",
    "Pearson r": "Linear correlation of predicted and measured changes (scipy.stats.pearsonr); undefined as Spearman's rho.",
    "precision@k": "|top-k pieces by |predicted change| ∩ top-k pieces by |measured change|| / k.",
    "bootstrap interval": f"{CONFIDENCE:.0%} BCa interval of the mean over edits from {N_RESAMPLES} resamples of the "
                          "edits (scipy.stats.bootstrap, seed 0); percentile interval when BCa is undefined.",
    "clustered bootstrap interval": f"{CONFIDENCE:.0%} percentile interval of a correlation over (edit, test) points "
                                    "from ripple.bootstrap_resamples (default 1000) resamples of whole edits with replacement (scipy.stats.bootstrap, "
                                    "seed 0): the points of one edit are not independent, so edits are the unit resampled; "
                                    "resamples whose correlation is undefined are left out (no interval when they are "
                                    "half or more).",
    "forecast rank": "A forecast ranks every piece it scores for an edit (the run's stored pieces and the edit's own "
                     "test queries) by |score|, largest first: the pieces it expects the edit to move most, whichever "
                     "the direction.",
    "verified pieces": "forecast --verify K measures, per edit, every predictor's top K, a seeded random sample of as "
                       "many of the other stored pieces, and the edit's own test queries; precision@k and the "
                       "correlations are computed over these measured pieces.",
    "own-test recall": "Of an edit's own test queries that should change (not a stable test), the fraction the "
                       "forecast ranks in its top k; the stable ones ranked there are reported apart, as false alarms.",
    "multi-hop accuracy": "Fraction of MQuAKE cases whose multi-hop question is an exact match for the new answer "
                          "after the case's edit.",
    "AUROC": "Probability that a predictor scores one of the edit's own test queries above another edit's test query "
             "(Mann-Whitney U / (n_own n_other), scipy.stats.mannwhitneyu; ties count half), pooled over edits.",
}


class Describe(BaseModel):
    """Summary of a sample (``DEFINITIONS['describe']``); every figure None when it is empty."""

    n: int = 0
    mean: Optional[float] = None
    std: Optional[float] = None
    min: Optional[float] = None
    median: Optional[float] = None
    max: Optional[float] = None


class Interval(BaseModel):
    """A statistic with its bootstrap interval (``DEFINITIONS['bootstrap interval']``)."""

    estimate: Optional[float] = None
    low: Optional[float] = None
    high: Optional[float] = None
    n: int = 0
    confidence: float = CONFIDENCE


class Correlation(BaseModel):
    """A correlation over (edit, test) points with its clustered bootstrap interval."""

    value: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    n_points: int = 0
    n_edits: int = 0


def _finite(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        a = values.detach().double().cpu().numpy().ravel()
    else:
        a = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def describe(values: Sequence[Optional[float]] | torch.Tensor) -> Describe:
    """:class:`Describe` of the finite values (None and NaN are left out)."""
    a = _finite(values)
    if a.size == 0:
        return Describe()
    return Describe(n=int(a.size), mean=float(a.mean()), std=float(a.std(ddof=1)) if a.size > 1 else 0.0,
                    min=float(a.min()), median=float(np.median(a)), max=float(a.max()))


def _defined(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() >= 3 and float(a.double().std()) > 0 and float(b.double().std()) > 0


def spearman(predicted: torch.Tensor, measured: torch.Tensor) -> Optional[float]:
    """Spearman's rho of two (n,) tensors (``DEFINITIONS["Spearman's rho"]``); None when undefined."""
    if not _defined(predicted, measured):
        return None
    return float(sstats.spearmanr(predicted.double().numpy(), measured.double().numpy()).statistic)


def pearson(predicted: torch.Tensor, measured: torch.Tensor) -> Optional[float]:
    """Pearson's r of two (n,) tensors (``DEFINITIONS['Pearson r']``); None when undefined."""
    if not _defined(predicted, measured):
        return None
    return float(sstats.pearsonr(predicted.double().numpy(), measured.double().numpy()).statistic)


def token_accuracy(argmax: torch.Tensor, answer: Sequence[int]) -> float:
    """``DEFINITIONS['teacher-forced token accuracy']`` of one answer: argmax (n,) int64 against its n tokens."""
    return float((argmax == torch.as_tensor(list(answer), dtype=argmax.dtype)).double().mean())


def locality(before: torch.Tensor, after: torch.Tensor) -> float:
    """``DEFINITIONS['locality']`` of one query: the fraction of its answer positions whose argmax token is unchanged."""
    return float((before == after).double().mean())


def precision_at_k(predicted: torch.Tensor, measured: torch.Tensor, k: int) -> Optional[float]:
    """``DEFINITIONS['precision@k']`` for two (n,) tensors; None when n == 0."""
    k = min(k, predicted.numel())
    if k == 0:
        return None
    top_p = set(predicted.abs().topk(k).indices.tolist())
    top_m = set(measured.abs().topk(k).indices.tolist())
    return len(top_p & top_m) / k


def bootstrap_interval(values: Sequence[Optional[float]], statistic: Callable = np.mean) -> Interval:
    """``statistic`` of the finite values with its bootstrap interval (``DEFINITIONS['bootstrap interval']``).

    Fewer than 2 values give the estimate with no interval; identical values give a zero-width one.
    """
    a = _finite(values)
    if a.size == 0:
        return Interval()
    est = float(statistic(a))
    if a.size < 2:
        return Interval(estimate=est, n=1)
    if np.ptp(a) == 0:
        return Interval(estimate=est, low=est, high=est, n=int(a.size))
    kw = dict(confidence_level=CONFIDENCE, n_resamples=N_RESAMPLES, rng=np.random.default_rng(0))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", sstats.DegenerateDataWarning)
        ci = sstats.bootstrap((a,), statistic, method="BCa", **kw).confidence_interval
        if not (np.isfinite(ci.low) and np.isfinite(ci.high)):
            ci = sstats.bootstrap((a,), statistic, method="percentile", **kw).confidence_interval
    return Interval(estimate=est, low=float(ci.low), high=float(ci.high), n=int(a.size))


def _corr(kind: str, x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (Pearson of average ranks, as scipy.stats.spearmanr) or Pearson's r; NaN when undefined."""
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    if kind == "spearman":
        x, y = sstats.rankdata(x), sstats.rankdata(y)
    return float(np.corrcoef(x, y)[0, 1])


def _weighted_ranks(v: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Average ranks (as scipy.stats.rankdata) of the values ``v`` (n,) repeated ``W`` (R, n) times each, per row:
    a value preceded by b repeats and tied with c of them (itself included) has rank b + (c + 1) / 2."""
    values, inv = np.unique(v, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(inv[order])) + 1]
    tied = np.add.reduceat(W[:, order], starts, axis=1)  # (R, distinct values)
    rank = np.cumsum(tied, axis=1) - tied + (tied + 1) / 2
    return rank[:, inv]


def _weighted_corr(kind: str, x: np.ndarray, y: np.ndarray, W: np.ndarray) -> np.ndarray:
    """:func:`_corr` of each row's multiset (point i repeated ``W[r, i]`` times): (R,) float64, NaN where undefined."""
    present = W > 0
    n = W.sum(1)
    const = [(np.where(present, v, np.inf).min(1) == np.where(present, v, -np.inf).max(1)) for v in (x, y)]
    if kind == "spearman":
        x, y = _weighted_ranks(x, W), _weighted_ranks(y, W)
    else:
        x, y = np.broadcast_to(x, W.shape), np.broadcast_to(y, W.shape)
    mx, my = (W * x).sum(1) / n, (W * y).sum(1) / n
    dx, dy = x - mx[:, None], y - my[:, None]
    r = (W * dx * dy).sum(1) / np.sqrt((W * dx * dx).sum(1) * (W * dy * dy).sum(1))
    r[(n < 3) | const[0] | const[1]] = np.nan
    return np.clip(r, -1.0, 1.0)


def clustered_correlation(x: Sequence[float], y: Sequence[float], clusters: Sequence[int], kind: str = "spearman",
                          n_resamples: int = N_RESAMPLES) -> Correlation:
    """Spearman's rho or Pearson's r of paired points, with the interval of
    ``DEFINITIONS['clustered bootstrap interval']`` (clusters = the edit each point belongs to).

    Raises:
        ValueError: ``kind`` is neither 'spearman' nor 'pearson'.
    """
    if kind not in ("spearman", "pearson"):
        raise ValueError(kind)
    x, y, c = (np.asarray(v, dtype=np.float64) for v in (x, y, clusters))
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, c = x[ok], y[ok], c[ok]
    groups = [np.flatnonzero(c == k) for k in np.unique(c)]
    value = _corr(kind, x, y)
    out = Correlation(value=value if np.isfinite(value) else None, n_points=int(x.size), n_edits=len(groups))
    if len(groups) < 2 or out.value is None:
        return out

    cluster_of = np.empty(x.size, dtype=np.int64)
    for k, g in enumerate(groups):
        cluster_of[g] = k

    def stat(idx, axis=-1):
        # a resample of clusters is each point repeated as often as its cluster was drawn: the correlation of
        # that multiset, for every resample at once, from per-point multiplicities
        idx = np.asarray(idx, dtype=np.int64)
        flat = idx.reshape(-1, idx.shape[-1])
        R, K = flat.shape[0], len(groups)
        counts = np.bincount((flat + K * np.arange(R)[:, None]).ravel(), minlength=R * K).reshape(R, K)
        r = _weighted_corr(kind, x, y, counts[:, cluster_of].astype(np.float64))
        return r.reshape(idx.shape[:-1])

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", sstats.DegenerateDataWarning)  # a constant resample: NaN, reported as None
        res = sstats.bootstrap((np.arange(len(groups)),), stat, vectorized=True, method="percentile", batch=128,
                               confidence_level=CONFIDENCE, n_resamples=n_resamples, rng=np.random.default_rng(0))
    dist = res.bootstrap_distribution[np.isfinite(res.bootstrap_distribution)]
    if dist.size >= n_resamples // 2:  # resamples whose points are constant have no correlation: left out
        tail = 50 * (1 - CONFIDENCE)
        out.ci_low, out.ci_high = (float(v) for v in np.percentile(dist, [tail, 100 - tail]))
    return out


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> Optional[float]:
    """``DEFINITIONS['AUROC']`` of ``scores`` for the positive ``labels``; None without both classes."""
    s, lab = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    ok = np.isfinite(s)
    s, lab = s[ok], lab[ok]
    pos, neg = s[lab], s[~lab]
    if pos.size == 0 or neg.size == 0:
        return None
    return float(sstats.mannwhitneyu(pos, neg).statistic / (pos.size * neg.size))


def definitions_markdown() -> str:
    """:data:`DEFINITIONS` as the Markdown table that docs/method.md quotes verbatim."""
    rows = ["| term | definition |", "|---|---|"]
    rows += [f"| {name} | {text.replace('|', chr(92) + '|')} |" for name, text in DEFINITIONS.items()]
    return "\n".join(rows)
