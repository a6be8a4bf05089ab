"""Rules and metrics are defined once: the docs, ripple/summary.json and the report quote the code."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gradcouple.metrics import (
    DEFINITIONS,
    bootstrap_interval,
    definitions_markdown,
    describe,
    pearson,
    precision_at_k,
    spearman,
)
from gradcouple.rules import (
    AnswerMatch,
    answer_continuation,
    answers_match,
    same_answer,
    same_answer_matrix,
    same_question,
    same_question_matrix,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "method.md"
ATOL = 1e-12


def test_docs_quote_the_definitions_table_verbatim():
    text = DOCS.read_text(encoding="utf-8")
    block = text.split("<!-- definitions:begin -->\n", 1)[1].split("\n<!-- definitions:end -->", 1)[0]
    assert block == definitions_markdown()


def test_every_rule_is_among_the_definitions():
    from gradcouple.rules import RULES

    assert all(DEFINITIONS[k] == v for k, v in RULES.items())


def test_same_question_means_a_shared_owner():
    assert same_question(["q1", "q2"], ["q2"]) and not same_question(["q1"], ["q3"])


def test_same_question_matrix_agrees_with_the_pairwise_rule():
    owners = [["a"], ["a", "b"], ["c"], ["b"]]
    m = same_question_matrix(owners)
    assert all(bool(m[i, j]) == same_question(owners[i], owners[j]) for i in range(4) for j in range(4))


def test_same_answer_is_case_folded_and_whitespace_insensitive():
    assert same_answer("the  Seine", "The Seine ") and not same_answer("Paris", "Paris, Texas")


def test_same_answer_matrix_agrees_with_the_pairwise_rule():
    answers = ["Paris", "paris", "Rome", " ROME"]
    m = same_answer_matrix(answers)
    assert all(bool(m[i, j]) == same_answer(answers[i], answers[j]) for i in range(4) for j in range(4))


@pytest.mark.parametrize("rule, candidate, expected", [
    (AnswerMatch.exact, "Paris", True), (AnswerMatch.exact, "paris", False),
    (AnswerMatch.case_folded, "PARIS", True), (AnswerMatch.case_folded, "City of Light", False),
    (AnswerMatch.alias, "city of light", True)])
def test_answer_match_rules(rule, candidate, expected):
    assert answers_match(candidate, "Paris", ["City of Light"], rule) is expected


def test_answer_continues_its_prompt_with_one_space_unless_the_prompt_ends_in_whitespace():
    assert answer_continuation("Answer:", " Paris ") == " Paris"
    assert answer_continuation("The capital is ", "Paris") == "Paris"


def test_describe_gives_sample_statistics_of_the_finite_values():
    d = describe([1.0, None, 3.0, float("nan"), 2.0])
    assert (d.n, d.mean, d.min, d.median, d.max) == (3, 2.0, 1.0, 2.0, 3.0)
    assert math.isclose(d.std, 1.0, abs_tol=ATOL)


def test_describe_of_nothing_is_empty():
    assert describe([]).n == 0 and describe([]).mean is None


def test_spearman_of_a_monotone_map_is_one_and_undefined_for_constants():
    x = torch.tensor([0.1, 0.5, 0.2, 0.9], dtype=torch.float64)
    assert math.isclose(spearman(x, x**3), 1.0, abs_tol=ATOL)
    assert spearman(x, torch.ones(4)) is None and spearman(x[:2], x[:2]) is None


def test_pearson_of_an_affine_map_is_one():
    x = torch.tensor([0.1, 0.5, 0.2, 0.9], dtype=torch.float64)
    assert math.isclose(pearson(x, 2 * x - 1), 1.0, abs_tol=ATOL)


def test_precision_at_k_counts_the_shared_top_k_by_magnitude():
    pred = torch.tensor([5.0, -4.0, 0.1, 0.2])
    meas = torch.tensor([-3.0, 0.0, 2.0, 0.1])
    assert precision_at_k(pred, meas, 2) == 0.5


def test_bootstrap_interval_brackets_the_mean():
    iv = bootstrap_interval([0.1, 0.4, 0.35, 0.8, 0.5, 0.2])
    assert math.isclose(iv.estimate, 0.391666666666666, abs_tol=1e-9)
    assert iv.low < iv.estimate < iv.high and iv.n == 6


def test_bootstrap_interval_of_one_value_has_no_width_to_estimate():
    iv = bootstrap_interval([0.3])
    assert iv.estimate == 0.3 and iv.low is None


@pytest.mark.parametrize("prompt, answer, scored", [
    ("The capital of France is", "Paris", " Paris"),
    ("The capital of China is", "北京", " 北京"),          # an English prompt: a word start
    ("中国的首都是", "北京", "北京"),                       # Chinese is written without spaces
    ("日本の首都は", "東京", "東京"),                       # Japanese too
    ("首都は？", "東京", "東京"),                           # after fullwidth punctuation
    ("ประเทศไทยมีเมืองหลวงคือ", "กรุงเทพ", "กรุงเทพ"),       # Thai
    ("한국의 수도는", "서울", " 서울"),                      # Korean separates words with spaces
    ("Answer:\n", "Paris", "Paris"),                        # the prompt already ends in whitespace
])
def test_the_leading_space_rule_follows_the_prompts_script(prompt, answer, scored):
    from gradcouple.rules import answer_continuation

    assert answer_continuation(prompt, answer) == scored


def test_the_clustered_bootstrap_equals_resampling_whole_clusters_point_by_point():
    """The vectorised interval (per-point multiplicities) against the plain one: each resample of clusters
    concatenated into its points and correlated with scipy (ties included)."""
    import warnings

    import numpy as np
    from scipy import stats

    from gradcouple.metrics import CONFIDENCE, clustered_correlation

    rng = np.random.default_rng(3)
    x = np.round(rng.normal(size=90), 1)
    y = x * 0.5 + np.round(rng.normal(size=90), 1)
    c = rng.integers(0, 12, size=90)
    groups = [np.flatnonzero(c == k) for k in np.unique(c)]
    for kind, fn in (("spearman", stats.spearmanr), ("pearson", stats.pearsonr)):
        def stat(idx):
            pts = np.concatenate([groups[int(i)] for i in idx])
            return fn(x[pts], y[pts]).statistic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = stats.bootstrap((np.arange(len(groups)),), stat, vectorized=False, method="percentile", n_resamples=300,
                                  confidence_level=CONFIDENCE, rng=np.random.default_rng(0)).confidence_interval
        got = clustered_correlation(x, y, c, kind, n_resamples=300)
        assert got.value == pytest.approx(fn(x, y).statistic, abs=1e-12)
        assert (got.ci_low, got.ci_high) == (pytest.approx(ref.low, abs=1e-12), pytest.approx(ref.high, abs=1e-12))
