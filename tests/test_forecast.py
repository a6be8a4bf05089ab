"""``gradcouple forecast``: edit-request formats, exact blockwise scores against dense float64
references, the stage on a tiny LLaMA run (top pieces, first order equal to the edit's own weight
change, --verify, resume) and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import random_pieces, tiny_gpt2, tiny_llama
from storeutil import write_store
from typer.testing import CliRunner

import gradcouple as gc
from gradcouple.cli.app import app
from gradcouple.config import RunConfig
from gradcouple.datasets import download, read_file, sample_path
from gradcouple.edits import edited, method_class
from gradcouple.errors import ConfigError, DataError
from gradcouple.gradients import batch_factors
from gradcouple.gram import contract, first_order
from gradcouple.layers import select_targets
from gradcouple.rundir import RunDir
from gradcouple.scoring import collate
from gradcouple.stages.couple import couple
from gradcouple.stages.edit_run import check_run
from gradcouple.stages.extract import extract
from gradcouple.stages.forecast import Forecaster, _prepare, edit_requests, forecast, read_requests, single_edit
from gradcouple.stages.report import report
from gradcouple.stages.report.load import load_run
from gradcouple.stores import Direction

FIXTURES = Path(__file__).parent / "fixtures"
EASYEDIT = FIXTURES / "easyedit_knowedit.json"
COUNTERFACT = FIXTURES / "counterfact.json"
REL_FLOAT64 = 1e-6      # forecast scores in float64 against the dense float64 reference, relative
REL_FLOAT32 = 1e-5      # the same in float32, relative to the Cauchy-Schwarz bound |g_j| |D|
FP16_REL = 3e-3         # an inner product through the fp16 store against the model's own gradient
runner = CliRunner()


# ---------------------------------------------------------------- edit-request formats


def test_easyedit_records_become_an_edit_its_original_and_its_tests():
    pieces, fmt, skipped = read_file(EASYEDIT)
    assert fmt == "easyedit" and skipped == {}
    by = {p.id: p for p in pieces}
    edit = by["easyedit:0:edit"]
    assert (edit.prompt, edit.answer, edit.answer_before, edit.triple.subject) == (
        "The name of the country of citizenship of Leonardo DiCaprio is", "Syria", "United States of America",
        "Leonardo DiCaprio")
    assert by["easyedit:0:original"].aliases == ["USA", "United States"]  # a list of alias lists
    reasoning = by["easyedit:0:portability.Reasoning.0"]
    assert (reasoning.answer, reasoning.aliases[:1], reasoning.criterion) == ("Syrian pound", ["SYP"], "Reasoning")
    assert by["easyedit:0:portability.Subject_Aliasing.0"].aliases == ["Syrian Arab Republic"]  # a list of strings
    assert by["easyedit:0:locality.Forgetfulness.0"].answer == "George DiCaprio"  # a string
    assert by["easyedit:0:paraphrase.0"].answer == "Syria" and by["easyedit:0:paraphrase.0"].criterion == "paraphrase"
    [r0, r1] = edit_requests(pieces)
    assert len(r0.tests) == 7 and [p.id for p in r0.originals] == ["easyedit:0:original"] and len(r1.tests) == 2


def test_counterfact_records_test_paraphrases_toward_the_new_target_and_neighbours_toward_the_true_one():
    pieces, fmt, _ = read_file(COUNTERFACT)
    assert fmt == "counterfact"
    by = {p.id: p for p in pieces}
    assert by["counterfact:0:edit"].prompt == "The mother tongue of Danielle Darrieux is"
    assert by["counterfact:0:paraphrase.1"].answer == "English" and by["counterfact:0:neighborhood.2"].answer == "French"
    assert not any("attribute" in p.id or "generation" in p.id for p in pieces)
    assert [len(r.tests) for r in edit_requests(pieces)] == [5, 3]


def test_an_mquake_case_is_one_request_of_all_its_rewrites():
    pieces, fmt, _ = read_file(sample_path("mquake-hard"))
    assert fmt == "mquake"
    req = edit_requests(pieces)[0]
    assert len(req.rewrites) == 4 and len(req.tests) == 1 and req.tests[0].criterion == "multi_hop"


@pytest.mark.parametrize("record,field", [
    ({"subject": "Paris", "prompt": "The capital of France is Paris and"}, "target_new"),
    ({"subject": "Rome", "prompt": "The capital of France is", "target_new": "Lyon"}, "subject"),
    ({"subject": "France", "prompt": "The capital of France is", "target_new": "Lyon",
      "portability": {"Reasoning": [{"prompt": "The river of the capital of France is"}]}}, "portability.Reasoning[0].ground_truth"),
])
def test_a_malformed_edit_request_names_its_file_record_and_field(tmp_path, record, field):
    path = tmp_path / "edits.json"
    path.write_text(json.dumps([{"subject": "France", "prompt": "The capital of France is", "target_new": "Lyon"}, record]))
    with pytest.raises(DataError) as e:
        read_requests(path, format="easyedit")
    msg = str(e.value)
    assert str(path) in msg and "record 2" in msg and f"'{field}'" in msg and "\n" not in msg
    assert "counted in forecast/summary.json" in msg
    requests, _, skipped = read_requests(path, format="easyedit", skip_bad=True)
    assert len(requests) == 1 and sum(skipped.values()) == 1


def test_an_unknown_format_is_refused_naming_its_keys(tmp_path):
    path = tmp_path / "edits.json"
    path.write_text(json.dumps([{"question": "x", "label": "y"}]))
    with pytest.raises(DataError, match="unknown record format.*keys: question, label"):
        read_requests(path)


def test_the_new_formats_download_as_benchmark_pieces(tmp_path):
    res = download(None, tmp_path / "cf", from_path=COUNTERFACT)
    assert res.meta.format == "counterfact" and res.meta.pieces_per_role == {"edit": 2, "original": 2, "test": 8}


# ---------------------------------------------------------------- exact blockwise scores


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def case(request):
    model = tiny_gpt2() if request.param == "gpt2" else tiny_llama()
    targets = select_targets(model, "all")
    pieces = random_pieces(9, seed=5)
    factors = batch_factors(model, targets, collate(pieces))
    edit = batch_factors(model, targets, collate(random_pieces(2, seed=17)))
    return SimpleNamespace(targets=targets, factors=factors, edit=edit, names=[t.name for t in targets])


def stored_dense(root: Path, kind: str, names: list[str], n: int) -> list[dict[str, torch.Tensor]]:
    """Every stored piece's gradient per target, read from the shard files with torch.load and
    materialised in float64: the dense reference (no gradcouple reading code)."""
    out: list[dict] = [dict() for _ in range(n)]
    for shard in sorted((root / "gradients").glob("shard-*.pt")):
        data = torch.load(shard, weights_only=True)
        for k, row in enumerate(data["rows"]):
            for name in names:
                e = data["layers"][name]
                if kind == "dense":
                    out[row][name] = e["g"][k].double() * float(e["scale"][k])
                else:
                    o = e["offsets"]
                    x = e["x"][o[k]:o[k + 1]].double() * float(e["x_scale"][k])
                    d = e["d"][o[k]:o[k + 1]].double() * float(e["d_scale"][k])
                    out[row][name] = d.t() @ x
    return out


def directions_of(case, which: str) -> tuple[dict[str, Direction], dict[str, torch.Tensor]]:
    """The directions a forecast scores with, and each as the float64 matrix it stands for (computed
    apart: the sum of the edit gradients' outer products, or the weight change itself, not its SVD)."""
    g = torch.Generator().manual_seed(3)
    if which == "edit gradient":  # two rewrites' gradients, summed, kept factored
        dirs = {n: Direction.of_factors(torch.cat([f.x[n] for f in case.edit]), torch.cat([f.d[n] for f in case.edit]))
                for n in case.names}
        return dirs, {n: sum(f.d[n].double().t() @ f.x[n].double() for f in case.edit) for n in case.names}
    dirs, mats = {}, {}
    for t in case.targets:
        u, v = torch.randn(t.d_out, 2, generator=g), torch.randn(t.d_in_aug, 2, generator=g)
        w = u @ v.t() if which == "rank-two change" else torch.randn(t.d_out, t.d_in_aug, generator=g)
        dirs[t.name], mats[t.name] = Direction.of_matrix(w), w.double()
    return dirs, mats


@pytest.mark.parametrize("kind", ["factors", "dense"])
@pytest.mark.parametrize("which", ["edit gradient", "rank-two change", "full-rank change"])
def test_forecast_scores_equal_dense_float64_scores(tmp_path, case, kind, which):
    reader = write_store(tmp_path, case.targets, case.factors, store=kind, order=[4, 1, 7, 0, 8, 2, 6, 3, 5], shard_size=4)
    dirs, mats = directions_of(case, which)
    if which == "rank-two change":
        assert all(d.factored and d.a.shape[1] == 2 for d in dirs.values())
    if which == "full-rank change":
        assert not any(d.factored for d in dirs.values())
    dense = stored_dense(tmp_path, kind, case.names, len(case.factors))
    ref = torch.tensor([sum(float((g[n] * mats[n]).sum()) for n in case.names) for g in dense], dtype=torch.float64)
    got = contract(reader, dirs, block_size=3, dtype=torch.float64)
    assert ((got - ref).abs() <= REL_FLOAT64 * ref.abs()).all(), (got - ref) / ref
    bound = torch.tensor([math.sqrt(sum(float((g[n] ** 2).sum()) for n in case.names)) for g in dense]) * \
        math.sqrt(sum(float((m ** 2).sum()) for m in mats.values()))
    got32 = contract(reader, dirs, block_size=3, dtype=torch.float32)
    assert ((got32 - ref).abs() <= REL_FLOAT32 * bound).all()


def test_a_low_rank_change_is_factored_exactly(case):
    t = case.targets[0]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(t.d_out, 1, generator=g) @ torch.randn(1, t.d_in_aug, generator=g)
    d = Direction.of_matrix(w)
    assert d.factored and d.a.shape[1] == 1
    assert torch.allclose(d.dense(torch.float64), w.double(), rtol=0, atol=1e-6 * float(w.abs().max()))


# ---------------------------------------------------------------- the stage on a tiny LLaMA run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """An extraction of 8 bundled RippleEdits records with a tiny random LLaMA (last two blocks)."""
    root = tmp_path_factory.mktemp("forecast")
    download("rippleedits", root / "data", from_path="sample", limit=8)
    cfg = RunConfig()
    cfg.data.pieces = root / "data" / "pieces.jsonl"
    cfg.model.name, cfg.model.layers = "llama-tiny-random", "last2"
    cfg.ripple.hparams = {"ft": {"steps": 3, "lr": 1e-2}}
    cfg.ripple.bootstrap_resamples = 50
    extract(cfg, root / "run", show_progress=False)
    r = check_run(cfg, root / "run", None, prepare=False, coupled=False)
    return SimpleNamespace(cfg=cfg, run=root / "run", r=r)


def forecast_with(tiny_run, requests, **settings):
    cfg = tiny_run.cfg.model_copy(deep=True)
    for k, v in settings.items():
        setattr(cfg.forecast, k, v)
    return forecast(cfg, tiny_run.run, requests, loaded=tiny_run.r.loaded, show_progress=False)


def test_an_edit_identical_to_a_stored_piece_ranks_it_first_with_its_own_norm(tiny_run):
    r = tiny_run.r
    j = next(i for i, p in enumerate(r.pieces) if p.role is None or p.role.value == "test")
    p = r.pieces[j]
    req = single_edit(p.prompt, p.answer)
    res = forecast_with(tiny_run, [req], predictors=["gradsim", "inner_product"], top_k=3)
    rows = {(x.predictor, x.rank): x for x in res.rows}
    assert rows["gradsim", 1].piece_id == p.id and rows["gradsim", 1].score == pytest.approx(1.0, abs=1e-3)
    sq = sum(r.manifest.records()[j].sq_norm.values())
    assert rows["inner_product", 1].score == pytest.approx(sq, rel=FP16_REL)


def test_first_order_is_the_stored_gradients_against_the_methods_own_weight_change(tiny_run):
    r, cfg = tiny_run.r, tiny_run.cfg
    requests, _, _ = read_requests(EASYEDIT)
    res = forecast_with(tiny_run, requests[:1], predictors=["first_order"], top_k=5)
    method = method_class("ft").resolve(cfg.ripple.hparams["ft"], model=r.loaded.model)
    req = requests[0]
    prep = _prepare(r, req, {})
    before = [p.detach().clone() for p in r.loaded.model.parameters()]
    with edited(method, r.context(), prep.rewrites) as delta:
        ref = first_order(r.reader, delta)
    assert all(torch.equal(a, b) for a, b in zip(before, r.loaded.model.parameters()))  # restored bit for bit
    got = {x.piece_id: x.score for x in res.rows if x.source == "store"}
    ids = [p.id for p in r.pieces]
    for pid, score in got.items():
        assert score == pytest.approx(float(ref[ids.index(pid)]), rel=1e-4, abs=1e-6 * float(ref.abs().max()))
    listed = [x.piece_id for x in res.rows if x.source == "store" and x.rank <= 5]  # own tests rank among them too
    top = sorted(range(len(ids)), key=lambda i: -abs(float(ref[i])))[:len(listed)]
    assert {ids[i] for i in top} == set(listed)
    own = [x for x in res.rows if x.own_test]
    assert len(own) == len(req.tests) and {x.criterion for x in own} >= {"Reasoning", "Relation_Specificity", "paraphrase"}


def test_rome_first_order_equals_its_rank_one_change_against_the_stored_gradients(tiny_run):
    """A low-rank method's change is factored (SVD) and the layers it leaves alone are skipped: the
    scores still equal <G_j, dW> with G_j read from the shard files and dW the method's own change."""
    r = tiny_run.r
    cfg = tiny_run.cfg.model_copy(deep=True)
    cfg.ripple.method = "rome"
    cfg.ripple.hparams = {"rome": {"layers": [2], "v_num_grad_steps": 4}}
    cfg.forecast.predictors, cfg.forecast.top_k = ["first_order"], len(r.pieces) + 100  # every stored piece listed
    requests, _, _ = read_requests(COUNTERFACT)
    res = forecast(cfg, tiny_run.run, requests[:1], loaded=r.loaded, show_progress=False)
    method = method_class("rome").resolve(cfg.ripple.hparams["rome"], model=r.loaded.model)
    with edited(method, r.context(), _prepare(r, requests[0], {}).rewrites) as delta:
        pass
    touched = [n for n, d in delta.items() if d.any()]
    assert len(touched) == 1 and int(torch.linalg.matrix_rank(delta[touched[0]].double(), rtol=1e-6)) == 1
    dense = stored_dense(tiny_run.run, "factors", r.manifest.names, len(r.pieces))
    ref = torch.tensor([sum(float((g[n] * delta[n].double()).sum()) for n in r.manifest.names) for g in dense])
    got = {x.piece_id: x.score for x in res.rows if x.source == "store"}
    ids = [p.id for p in r.pieces]
    assert len(got) == len(ids)
    for pid, score in got.items():
        assert score == pytest.approx(float(ref[ids.index(pid)]), rel=1e-4, abs=1e-5 * float(ref.abs().max()))


def test_verify_measures_top_pieces_a_sample_and_own_tests_and_restores_the_weights(tiny_run):
    requests, _, _ = read_requests(COUNTERFACT)
    model = tiny_run.r.loaded.model
    before = [p.detach().clone() for p in model.parameters()]
    res = forecast_with(tiny_run, requests, verify=4, top_k=4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    v = res.summary.verify
    assert v.k == 4 and v.n_edits == 2 and set(v.predictors) == {"first_order", "gradsim", "inner_product"}
    measured = [x for x in res.rows if x.predictor == "gradsim"]
    assert all(x.change is not None for x in measured)
    assert len([x for x in measured if x.own_test]) == 8  # both edits' own tests
    top = [x for x in measured if x.rank <= 4]
    assert len(top) == 8  # 4 per edit
    for e in res.summary.edits:
        stored = [x for x in res.rows if x.edit == e.id and x.source == "store"]
        tops = {x.piece_id for x in stored if x.rank <= 4}
        sample = {x.piece_id for x in stored} - tops  # measured stored pieces in no predictor's top 4
        assert len(sample) == len(tops) and isinstance(e.success, bool)
    fo = v.predictors["first_order"]
    assert fo.spearman.n_points == len(measured) and fo.precision_at_k.n == 2 and fo.recall_own_tests.n == 2
    assert res.summary.edits[0].edit_norm > 0 and set(res.summary.edits[0].seconds) == {"gradient", "scores", "edit", "verify"}
    saved, rows = RunDir(tiny_run.run).forecast.load()
    assert saved.verify == v and len(rows) == len(res.rows)


def test_an_interrupted_forecast_resumes_from_its_journal(tiny_run, monkeypatch):
    requests, _, _ = read_requests(EASYEDIT)
    full = forecast_with(tiny_run, requests, predictors=["gradsim"])
    calls = {"n": 0}
    original = Forecaster.forecast_one

    def dies_on_the_second(self, k, prep, show):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, k, prep, show)

    monkeypatch.setattr(Forecaster, "forecast_one", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        forecast_with(tiny_run, requests, predictors=["gradsim"], top_k=7)
    monkeypatch.setattr(Forecaster, "forecast_one", original)
    again = forecast_with(tiny_run, requests, predictors=["gradsim"], top_k=7)
    assert again.summary.resumed_edits == 1
    scores = {(x.edit, x.piece_id): x.score for x in full.rows}
    assert all(scores[x.edit, x.piece_id] == pytest.approx(x.score, rel=1e-9) for x in again.rows if (x.edit, x.piece_id) in scores)
    assert not list((Path(tiny_run.run) / "forecast").glob("journal-*"))


def test_an_edit_longer_than_the_max_length_is_skipped_and_counted(tiny_run, tmp_path):
    path = tmp_path / "edits.json"
    long = "The " + "very " * 300 + "capital of France is"
    path.write_text(json.dumps([{"subject": "France", "prompt": long, "target_new": "Lyon"},
                                {"subject": "France", "prompt": "The capital of France is", "target_new": "Lyon"}]))
    requests, _, _ = read_requests(path)
    res = forecast_with(tiny_run, requests, predictors=["gradsim"])
    assert res.summary.skipped == {"edit longer than the extraction's --max-length": 1}
    assert [e.id for e in res.summary.edits] == ["easyedit:1:edit"]


def test_an_edit_without_its_subject_and_a_test_longer_than_the_max_length_are_skipped_and_counted(tiny_run, tmp_path):
    path = tmp_path / "edits.jsonl"
    edit = {"id": "e:0:edit", "dataset": "e", "question_id": "0", "kind": "cloze", "prompt": "The capital of France is",
            "answer": "Lyon", "role": "edit", "triple": {"subject": "Germany", "relation": "capital", "object": "Lyon"}}
    ok = {**edit, "id": "e:1:edit", "question_id": "1", "triple": {"subject": "France", "relation": "capital", "object": "Lyon"}}
    long_test = {"id": "e:1:test", "dataset": "e", "question_id": "1", "kind": "cloze", "prompt": "The river of Lyon is",
                 "answer": "the " + "very " * 300 + "Rhone", "role": "test", "edit_id": "e:1:edit", "criterion": "x"}
    path.write_text("\n".join(json.dumps(x) for x in (edit, ok, long_test)) + "\n")
    requests, _, _ = read_requests(path)
    res = forecast_with(tiny_run, requests, predictors=["first_order"])
    assert res.summary.skipped == {"subject not in the prompt": 1, "test query longer than the extraction's --max-length": 1}
    assert [e.id for e in res.summary.edits] == ["e:1:edit"] and res.summary.edits[0].n_tests == 0
    gradient_only = forecast_with(tiny_run, requests, predictors=["gradsim"])  # no edit made: the subject is not read
    assert [e.id for e in gradient_only.summary.edits] == ["e:0:edit", "e:1:edit"]


def test_one_edit_from_the_command_line_prints_its_top_pieces_and_the_path(tiny_run):
    res = runner.invoke(app, ["forecast", "--run", str(tiny_run.run), "--edit", "The capital of France is", "--target", "Lyon",
                              "--subject", "France", "--predictor", "gradsim", "--top-k", "3"])
    assert res.exit_code == 0, res.output
    assert "The capital of France is -> Lyon" in res.output and "(gradsim; top 3 of" in res.output
    assert res.output.strip().splitlines()[-1].endswith("forecast.jsonl")


BAD_FILES = {"unknown.json": [{"question": "x", "label": "y"}],
             "no_target.json": [{"subject": "France", "prompt": "The capital of France is"}]}


@pytest.mark.parametrize("args,message", [
    (["--edits", "unknown.json"], "record 1: unknown record format (keys: question, label)"),
    (["--edits", "no_target.json"], "record 1: field 'target_new': missing"),
    (["--edits", "."], "a directory; pass a .json"),
    (["--edit", "The capital of France is", "--target", "Lyon", "--subject", "Germany"], "--subject 'Germany': not in the --edit prompt"),
    (["--edit", "The capital of France is"], "--edit and --target: both are needed"),
    (["--edits", str(EASYEDIT), "--predictor", "cosine"], "--predictor"),
])
def test_bad_forecast_input_is_one_line(tiny_run, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, records in BAD_FILES.items():
        (tmp_path / name).write_text(json.dumps(records))
    res = runner.invoke(app, ["forecast", "--run", str(tiny_run.run), *args])
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if line.startswith("error:")]) == 1


def test_the_python_api_returns_a_dataframe(tiny_run):
    df = gc.forecast(tiny_run.run, [{"subject": "France", "prompt": "The capital of France is", "target_new": "Lyon"}],
                     predictor="gradsim,inner_product", top_k=2)
    assert set(df.predictor) == {"gradsim", "inner_product"} and len(df) == 4
    assert {"edit", "piece_id", "prompt", "answer", "score", "rank"} <= set(df.columns)
    with pytest.raises(ConfigError, match="--edits FILE, or one edit"):
        gc.forecast(tiny_run.run)


def test_the_report_shows_the_latest_forecast(tiny_run):
    requests, _, _ = read_requests(COUNTERFACT)
    forecast_with(tiny_run, requests, predictors=["gradsim"], top_k=3)
    couple(tiny_run.cfg, tiny_run.run, show_progress=False)
    page = report(tiny_run.cfg, tiny_run.run).index_html.read_text(encoding="utf-8")
    assert 'id="forecast"' in page and "The mother tongue of Danielle Darrieux is" in page and "counterfact" in page


def test_a_projected_store_sketches_a_factored_direction_as_its_matrix(tmp_path, case):
    """The sketch is linear: a direction given by its factors (an edit's gradient) scores exactly as the
    same direction given as a matrix, so forecasts on a projected store inherit its unbiasedness."""
    reader = write_store(tmp_path, case.targets, case.factors, store="projected", proj_dim=4, proj_blocks=8, shard_size=4)
    factored, mats = directions_of(case, "edit gradient")
    dense = {n: Direction(matrix=m.float()) for n, m in mats.items()}
    a, b = contract(reader, factored, block_size=3), contract(reader, dense, block_size=3)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


def test_an_unreadable_forecast_is_left_out_of_the_report_with_a_warning(tiny_run, caplog):
    requests, _, _ = read_requests(COUNTERFACT)
    forecast_with(tiny_run, requests, predictors=["gradsim"], top_k=3)
    couple(tiny_run.cfg, tiny_run.run, show_progress=False)
    path = RunDir(tiny_run.run).forecast.summary_path
    path.write_text(path.read_text()[:100])
    assert load_run(tiny_run.run).forecast is None
    assert "leaves the forecast out" in caplog.text and str(path) in caplog.text
