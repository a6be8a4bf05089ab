"""Benchmark edits: their grouping, the predictors, the edit methods' defining properties, the
statistics, and the whole benchmark ripple on a tiny model."""

from __future__ import annotations

import numpy as np
from pathlib import Path

import pytest
import torch

from gradcouple.stages.benchmark import benchmark_edits
from gradcouple.config import RunConfig
from gradcouple.stages.couple import couple
from gradcouple.edits import ft_edit, restore, snapshot
from gradcouple.stages.extract import extract
from gradcouple.keys import keys_at
from gradcouple.layers import select_targets
from gradcouple.metrics import clustered_correlation
from gradcouple.models import byte_level_tokenizer
from gradcouple.pieces import KnowledgePiece, PieceRole, Triple, write_pieces
from gradcouple.predictors import PREDICTORS
from gradcouple.stages.ripple import ripple
from gradcouple.errors import ConfigError
from gradcouple.rundir import RunDir
from gradcouple.scoring import answer_logprob, collate, encode, subject_position

from conftest import random_pieces, tiny_gpt2, tiny_llama

FLOAT32_ROUNDING = 1e-6  # w + dw - w in float32 differs from dw by an ulp of w
INFORMATIVE = ("gradsim", "inner_product", "first_order", "activation_cosine", "whitened_key")


def _edit_pieces(n_edits=2, tests_per_edit=3) -> list[KnowledgePiece]:
    """Edits of 'The country of S is' to a new country, each with test queries and their conditions."""
    subjects = ["Leonardo DiCaprio", "Paris", "Mount Fuji", "the Danube"][:n_edits]
    news, trues = ["Syria", "Italy", "Kenya", "Peru"], ["United States", "France", "Japan", "Germany"]
    out = []
    for i, subj in enumerate(subjects):
        eid = f"re:{i}:edit"
        prompt = f"The name of the country of {subj} is"
        out.append(KnowledgePiece(id=eid, dataset="re", question_id=str(i), kind="cloze", prompt=prompt, answer=news[i],
                                  role=PieceRole.edit, answer_before=trues[i],
                                  triple=Triple(subject=subj, relation="COUNTRY", object=news[i])))
        out.append(KnowledgePiece(id=f"re:{i}:original", dataset="re", question_id=str(i), kind="cloze", prompt=prompt,
                                  answer=trues[i], role=PieceRole.original, edit_id=eid, counterfactual=news[i]))
        for j, (rel, ans) in enumerate([("capital", "Damascus"), ("currency", "pound"), ("language", "Arabic")][:tests_per_edit]):
            out.append(KnowledgePiece(id=f"re:{i}:condition{j}", dataset="re", question_id=str(i), kind="cloze",
                                      prompt=f"The {rel} of {news[i]} is", answer=f"{ans}{i}", role=PieceRole.condition, edit_id=eid))
            out.append(KnowledgePiece(id=f"re:{i}:test{j}", dataset="re", question_id=str(i), kind="cloze",
                                      prompt=f"The {rel} of the country of {subj} is", answer=f"{ans}{i}", role=PieceRole.test,
                                      edit_id=eid, criterion="Compositionality_I" if j < 2 else "Logical_Generalization",
                                      condition_id=f"re:{i}:condition{j}"))
    return out


def test_edits_group_their_tests_originals_and_conditions():
    pieces = _edit_pieces()
    edits = benchmark_edits(pieces)
    assert len(edits) == 2
    e = edits[1]
    assert [pieces[i].id for i in e.edits] == ["re:1:edit"] and [pieces[i].id for i in e.originals] == ["re:1:original"]
    assert [pieces[i].id for i in e.tests] == ["re:1:test0", "re:1:test1", "re:1:test2"]
    assert [pieces[i].id for i in e.conditions] == ["re:1:condition0", "re:1:condition1", "re:1:condition2"]


def test_every_named_predictor_is_registered_with_a_definition():
    assert set(PREDICTORS) == {"gradsim", "gradsim_old_answer", "inner_product", "norm", "first_order",
                               "activation_cosine", "whitened_key", "key_inner_product", "prior_logprob", "shuffled"}
    assert all(len(d) > 20 for _, d in PREDICTORS.values())


def test_subject_position_with_a_byte_level_bpe_tokenizer():
    tok = byte_level_tokenizer()
    enc = encode(tok, "The country of Leonardo DiCaprio is", " Syria")
    pos = subject_position(tok, enc, "Leonardo DiCaprio")
    assert tok.decode(enc.ids[:pos + 1]).endswith("Leonardo DiCaprio")
    assert not tok.decode(enc.ids[:pos]).endswith("Leonardo DiCaprio")


def test_subject_position_with_a_sentencepiece_tokenizer():
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(["The country of Leonardo DiCaprio is Syria.", "Leonardo painted; DiCaprio acted."] * 20,
                           vocab_size=120, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=sp)
    enc = encode(tok, "The country of Leonardo DiCaprio is", " Syria")
    pos = subject_position(tok, enc, "Leonardo DiCaprio")
    assert any(t.startswith("▁") for t in tok.convert_ids_to_tokens(list(enc.ids)))
    assert tok.decode(enc.ids[:pos + 1]).replace(" ", "").endswith("LeonardoDiCaprio")
    assert not tok.decode(enc.ids[:pos]).replace(" ", "").endswith("LeonardoDiCaprio")


def test_subject_position_is_none_when_the_prompt_does_not_name_the_subject():
    tok = byte_level_tokenizer()
    assert subject_position(tok, encode(tok, "The country of him is", " Syria"), "Leonardo DiCaprio") is None


def test_ft_edit_respects_the_weight_change_bound():
    model = tiny_llama()
    targets = select_targets(model, "all")
    saved = snapshot(targets)
    deltas = ft_edit(model, targets, random_pieces(2, seed=3), steps=5, lr=1e-2, max_delta=1e-3)
    assert max(float(d.abs().max()) for d in deltas.values()) <= 1e-3 + FLOAT32_ROUNDING
    assert restore(targets, saved)


def test_ft_edit_stops_once_the_new_answer_is_greedy():
    model = tiny_llama()
    targets = select_targets(model, "all")
    piece = random_pieces(1, seed=4)
    saved = snapshot(targets)
    long = ft_edit(model, targets, piece, steps=200, lr=1e-2, early_stop=False)
    restore(targets, saved)
    short = ft_edit(model, targets, piece, steps=200, lr=1e-2, early_stop=True)
    restore(targets, saved)
    norm = lambda d: sum(float((v ** 2).sum()) for v in d.values()) ** 0.5  # noqa: E731
    assert norm(short) < norm(long)


def test_first_order_error_falls_with_the_edit_step():
    """|measured - <g, Δθ>| / |measured| shrinks about linearly with the step (the error is second order)."""
    from gradcouple.gradients import batch_factors

    model = tiny_llama()
    targets = select_targets(model, "all")
    edit, other = random_pieces(2, seed=6)
    f = batch_factors(model, targets, collate([other]))[0]
    rel = []
    for lr in (1e-2, 1e-3):
        saved = snapshot(targets)
        with torch.no_grad():
            before = float(answer_logprob(model, collate([other])))
        deltas = ft_edit(model, targets, [edit], steps=1, lr=lr)
        with torch.no_grad():
            measured = float(answer_logprob(model, collate([other]))) - before
        restore(targets, saved)
        predicted = sum(float((f.dense(t.name) * deltas[t.name]).sum()) for t in targets)
        rel.append(abs(measured - predicted) / abs(measured))
    assert rel[1] < 0.3 * rel[0]


def test_clustered_correlation_of_perfectly_correlated_points_is_one_with_a_zero_width_interval():
    x = np.arange(60, dtype=float)
    c = np.repeat(np.arange(12), 5)
    r = clustered_correlation(x, 2 * x + 1, c, "pearson", n_resamples=200)
    assert r.value == pytest.approx(1.0) and r.ci_low == pytest.approx(1.0) and r.ci_high == pytest.approx(1.0)


def test_clustered_correlation_of_independent_points_covers_zero():
    rng = np.random.default_rng(7)
    x, y, c = rng.normal(size=400), rng.normal(size=400), np.repeat(np.arange(40), 10)
    r = clustered_correlation(x, y, c, "spearman", n_resamples=300)
    assert r.ci_low < 0 < r.ci_high and r.n_edits == 40


def coupled_edit_run(root, n_edits=3, tests_per_edit=3, steps=5, covariance_tokens=2000, resamples=50,
                     layers="last4") -> RunConfig:
    """Benchmark-edit pieces extracted and coupled in ``root/run`` with the tiny LLaMA; the config ripple uses."""
    write_pieces(root / "p.jsonl", _edit_pieces(n_edits=n_edits, tests_per_edit=tests_per_edit))
    cfg = RunConfig()
    cfg.data.pieces = root / "p.jsonl"
    cfg.model.name, cfg.model.layers = "llama-tiny-random", layers
    cfg.ripple.hparams = {"ft": {"steps": steps, "lr": 1e-2}}
    cfg.ripple.covariance_tokens, cfg.ripple.bootstrap_resamples = covariance_tokens, resamples
    extract(cfg, root / "run", show_progress=False)
    couple(cfg, root / "run", show_progress=False)
    return cfg


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    cfg = coupled_edit_run(root)
    return cfg, root / "run", ripple(cfg, root / "run", show_progress=False).summary


def test_benchmark_mode_is_chosen_for_pieces_that_carry_edits(benchmark_run):
    _, run, s = benchmark_run
    assert s.mode == "benchmark" and RunDir(run).ripple.latest().tests_path.is_file() and not RunDir(run).ripple.latest().edits_path.exists()


def test_benchmark_measures_every_test_of_every_edit_once(benchmark_run):
    _, run, s = benchmark_run
    _, rows = RunDir(run).ripple.load()
    assert len(rows) == 9 and len({r.test_id for r in rows}) == 9 and s.n_tests == 9


def test_the_forward_only_baselines_are_the_prior_logprob_and_the_key_inner_product(benchmark_run):
    _, run, s = benchmark_run
    _, rows = RunDir(run).ripple.load()
    assert all(r.predictors["prior_logprob"] == pytest.approx(r.logprob_before, abs=1e-9) for r in rows)
    # <k_e, k_q> and cos(k_e, k_q) differ by positive norms only: same sign, and within an edit the ratio is |k_e| |k_q|
    assert all((r.predictors["key_inner_product"] > 0) == (r.predictors["activation_cosine"] > 0) for r in rows)


def test_benchmark_reports_every_predictor_pooled_and_per_criterion(benchmark_run):
    _, _, s = benchmark_run
    assert set(s.predictors) == set(PREDICTORS)
    counted = {r for r in ("Compositionality_I", "Logical_Generalization")} if s.n_successful else set()
    assert all(set(p.criteria) == counted for p in s.predictors.values())


def test_benchmark_counts_only_tests_of_successful_edits(benchmark_run):
    _, run, s = benchmark_run
    _, rows = RunDir(run).ripple.load()
    assert s.n_tests_counted == sum(r.edit_success for r in rows)
    assert s.predictors["gradsim"].pooled.spearman.n_points == s.n_tests_counted


def test_benchmark_restores_every_edit(benchmark_run):
    _, _, s = benchmark_run
    assert all(e.restored for e in s.edits) and all(e.subject_key_found for e in s.edits)


def test_benchmark_quotes_its_definitions(benchmark_run):
    _, _, s = benchmark_run
    assert {"AUROC", "clustered bootstrap interval", "exact match", "condition known"} <= set(s.definitions)


def test_identical_query_rises_most_and_informative_predictors_rank_it_first(tmp_path):
    """Planted coupling: a test query that IS the edit (same prompt, new answer) against unrelated ones."""
    pieces = _edit_pieces(n_edits=1, tests_per_edit=3)
    edit = pieces[0]
    pieces.append(edit.model_copy(update={"id": "re:0:test_same", "role": PieceRole.test, "edit_id": edit.id,
                                          "criterion": "planted", "answer_before": None}))
    write_pieces(tmp_path / "p.jsonl", pieces)
    cfg = RunConfig()
    cfg.data.pieces = tmp_path / "p.jsonl"
    cfg.model.name = "llama-tiny-random"
    cfg.ripple.hparams = {"ft": {"steps": 3, "lr": 3e-3, "early_stop": False}}
    cfg.ripple.covariance_tokens, cfg.ripple.bootstrap_resamples = 1000, 20
    extract(cfg, tmp_path / "run", show_progress=False)
    couple(cfg, tmp_path / "run", show_progress=False)
    ripple(cfg, tmp_path / "run", show_progress=False)
    _, rows = RunDir(tmp_path / "run").ripple.load()
    same = next(r for r in rows if r.test_id == "re:0:test_same")
    others = [r for r in rows if r.test_id != "re:0:test_same"]
    assert same.rise > max(r.rise for r in others)
    for name in INFORMATIVE:
        assert same.predictors[name] > max(r.predictors[name] for r in others), name


@pytest.fixture(scope="module")
def sweep_run(benchmark_run):
    cfg, run, _ = benchmark_run
    knobs = {"ft": {**cfg.ripple.hparams["ft"], "early_stop": False}}
    swept = cfg.model_copy(update={"ripple": cfg.ripple.model_copy(update={"sweep": [1e-3, 3e-2], "hparams": knobs})})
    return run, ripple(swept, run, show_progress=False).sweep


def test_sweep_evaluates_the_same_edits_at_each_strength(sweep_run):
    run, sw = sweep_run
    assert sw.knob == "lr" and [p.strength for p in sw.points] == [1e-3, 3e-2]
    assert all(p.n_edits == 3 and set(p.spearman) == set(PREDICTORS) for p in sw.points)
    assert RunDir(run).ripple.sets()[-1].load_sweep() == sw


def test_results_of_each_method_and_setting_stand_side_by_side(benchmark_run, tmp_path):
    """`ripple --method ft` on a run with rome results replaced them (summary and tests)."""
    import shutil

    import gradcouple as gc

    _, run, ft = benchmark_run
    shutil.copytree(run, tmp_path / "run")
    rome = gc.ripple(tmp_path / "run", method="rome")
    again = gc.ripple(tmp_path / "run", method="ft")  # the settings of the first ft set: that set, made again
    other = gc.ripple(tmp_path / "run", method="ft", steps=2)  # another setting of ft: a set of its own
    sets = RunDir(tmp_path / "run").ripple.sets()
    names = [r.name for r in sets]  # the module's run may hold sets of other tests (a sweep) before these
    assert names[-3:] == [rome.results, again.results, other.results]
    sets = sets[-3:]
    assert again.results.startswith("ft-") and rome.results.startswith("rome-") and again.summary.n_edits == ft.n_edits
    assert (again.summary.hparams["steps"], other.summary.hparams["steps"]) == (5, 2)
    assert sets[0].load()[0].method == "rome"  # ft twice replaced nothing of rome's
    view = gc.load_run(tmp_path / "run")
    assert list(view.ripples)[-3:] == names[-3:] and view.ripple["summary"].hparams == other.summary.hparams
    assert list(view.ripple_results.method)[-3:] == ["rome", "ft", "ft"]
    rep = gc.report(tmp_path / "run")
    listed = rep.summary["experiment_readiness"]["ripple_results"]
    assert [x["name"] for x in listed][-3:] == names[-3:]
    page = rep.index_html.read_text()
    assert 'id="ripple-sets"' in page and all(f"<code>{r.name}</code>" in page for r in sets)


def test_a_sweep_names_its_knob_and_warns_when_no_edit_succeeds(benchmark_run, tmp_path, caplog, monkeypatch):
    """--sweep 1e-4,1e-3 on rome edits read the learning rates as value clamps: every edit failed, silently.
    (Whether an edit succeeds is the tiny random model's business; the warning is tested by ruling every
    edit a failure.)"""
    import shutil

    import gradcouple as gc
    from gradcouple.stages import benchmark as stage

    _, run, _ = benchmark_run
    shutil.copytree(run, tmp_path / "run")
    with caplog.at_level("INFO", logger="gradcouple"):
        sw = gc.ripple(tmp_path / "run", method="rome", sweep="1e-4,1e-3", v_num_grad_steps=3).sweep  # few steps: fast
    assert sw.knob == "clamp_norm_factor" and [p.strength for p in sw.points] == [1e-4, 1e-3]
    assert "sweep: clamp_norm_factor (--clamp-norm-factor) of rome edits at 0.0001, 0.001." in caplog.text
    monkeypatch.setattr(stage, "edit_succeeded", lambda *a: False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="gradcouple"):
        gc.ripple(tmp_path / "run", method="rome", sweep="clamp-norm-factor=2e-4", v_num_grad_steps=3)
    assert "--sweep: at clamp_norm_factor=0.0002 none of the 3 rome edits succeeded; check that clamp_norm_factor is " \
           "the knob you meant to vary" in caplog.text
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"--sweep lr=1e-4,1e-3: lr is not a knob of rome edits, whose knobs are "
                                          r"layers \(--edit-layers\), fact_token, v_num_grad_steps"):
        gc.ripple(tmp_path / "run", method="rome", sweep="lr=1e-4,1e-3")
    sw = gc.ripple(tmp_path / "run", method="ft", sweep="lr=3e-2", steps=2).sweep
    assert sw.knob == "lr" and [p.strength for p in sw.points] == [3e-2]


def test_the_report_draws_the_sweep_per_predictor(sweep_run):
    from gradcouple.stages.report.figures import sweep_figure
    from gradcouple.stages.report.load import load_run

    run, sw = sweep_run
    r = load_run(run)
    assert [s for _, s in r.sweeps][-1] == sw
    fig = sweep_figure(r)
    by = {t.name: t for t in fig.data}
    assert set(by) == set(PREDICTORS) and fig.layout.xaxis.type == "log"  # 1e-3 .. 3e-2 spans more than 10x
    for name in ("gradsim", "first_order"):
        assert list(by[name].x) == [1e-3, 3e-2] and list(by[name].y) == [p.spearman[name].value for p in sw.points]
    page = gc_report(run)
    assert 'id="sweep"' in page and 'id="fig-sweep"' in page


def gc_report(run) -> str:
    import gradcouple as gc

    return Path(gc.report(run).index_html).read_text(encoding="utf-8")


def test_a_stronger_edit_raises_its_own_tests_more(sweep_run):
    weak, strong = sweep_run[1].points
    assert strong.mean_rise_own_tests.mean > weak.mean_rise_own_tests.mean


def test_edit_success_compares_each_rewrite_with_its_own_original():
    from gradcouple.stages.benchmark import edit_succeeded

    pieces = _edit_pieces(n_edits=2)
    edit = benchmark_edits(pieces)[0]
    # a two-rewrite edit whose originals come in the other order than its edit pieces
    second = benchmark_edits(pieces)[1]
    edit.edits, edit.originals = [edit.edits[0], second.edits[0]], [second.originals[0], edit.originals[0]]
    before = torch.zeros(len(pieces), dtype=torch.float64)
    after = torch.zeros(len(pieces), dtype=torch.float64)
    after[edit.edits[0]], after[edit.originals[1]] = -1.0, -2.0   # rewrite 0 beats its own original
    after[edit.edits[1]], after[edit.originals[0]] = -1.0, -3.0   # rewrite 1 beats its own original
    assert edit_succeeded(pieces, edit, before, after)
    after[edit.originals[1]] = 0.0                                 # rewrite 0 no longer does
    assert not edit_succeeded(pieces, edit, before, after)
