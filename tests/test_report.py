"""The report stage, specified on a real small run: pieces written with the library, gradients
extracted from the tiny random LLaMA, the real couple and ripple stages. Expected values are
read back from the run's own files (stats.json, manifest.json, cosine.pt, ripple/summary.json)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest
import torch
from markupsafe import escape

from gradcouple.config import RunConfig
from gradcouple.couple import couple
from gradcouple.errors import ArtifactError
from gradcouple.extract import extract
from gradcouple.metrics import DEFINITIONS, Interval
from gradcouple.pieces import KnowledgePiece, PieceKind, write_pieces
from gradcouple.report import SECTIONS, Headline, build_summary, load_run, render_html, report
from gradcouple.report.figures import distribution, heatmap
from gradcouple.ripple import ripple

ATOL = 1e-12  # float64 sums of the same numbers in another order
HEATMAP_ROUNDING = 5e-5  # heatmap cells are rounded to 4 decimals
NASTY = '<b>Tom & "Jerry"</b>'  # must reach the page escaped, never as markup
PLOTLY_BUNDLE = "* plotly.js v"  # the header comment of the embedded plotly.js library
FIGURE_DIV = 'class="plotly-graph-div"'
# question/hop order with a natural sort: q2 before q10, the whole question after its hops
HEATMAP_ORDER = ["toy:q1:0", "toy:q1:1", "toy:q1:q", "toy:q2:0", "toy:q2:1", "toy:q10:0", "toy:q10:1", "toy:q10:q"]


def _piece(q: int, hop, prompt: str, answer: str, counterfactual=None) -> KnowledgePiece:
    kind = PieceKind.multi_hop if hop is None else PieceKind.single_hop
    return KnowledgePiece(id=f"toy:q{q}:{'q' if hop is None else hop}", dataset="toy", question_id=f"q{q}", hop=hop,
                          kind=kind, prompt=prompt, answer=answer, counterfactual=counterfactual)


def _pieces() -> list[KnowledgePiece]:
    """Eight pieces of three questions, written out of order; one counterfactual per question."""
    return [
        _piece(10, 1, "Which river flows through Paris?", "the Seine", counterfactual="the Thames"),
        _piece(10, 0, "What is the capital of France?", "Paris"),
        _piece(10, None, "Which river flows through the capital of France?", "the Seine"),
        _piece(2, 0, f"Who chases whom in {NASTY}?", "Tom", counterfactual="Jerry"),
        _piece(2, 1, "Which animal is Jerry?", "a mouse"),
        _piece(1, 1, "In which town was William Shakespeare born?", "Stratford"),
        _piece(1, 0, "Who wrote Hamlet?", "William Shakespeare", counterfactual="Christopher Marlowe"),
        _piece(1, None, "In which town was the author of Hamlet born?", "Stratford"),
    ]


def _config(pieces: Path) -> RunConfig:
    cfg = RunConfig()
    cfg.data.pieces = pieces
    cfg.model.name = "llama-tiny-random"
    cfg.ripple.n_edits = 2
    cfg.ripple.steps = 2
    return cfg


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, RunConfig]:
    """A complete run (extract, couple, ripple) and its config; copy it before changing anything."""
    root = tmp_path_factory.mktemp("made")
    write_pieces(root / "pieces.jsonl", _pieces())
    cfg = _config(root / "pieces.jsonl")
    extract(cfg, root / "run", show_progress=False)
    couple(cfg, root / "run", show_progress=False)
    ripple(cfg, root / "run", show_progress=False)
    return root / "run", cfg


@pytest.fixture
def run_dir(made, tmp_path) -> Path:
    """A private copy of the run."""
    return Path(shutil.copytree(made[0], tmp_path / "run"))


@pytest.fixture(scope="module")
def reported(made, tmp_path_factory):
    """The report of a copy of the run: (run directory, ReportResult). Read only."""
    run = Path(shutil.copytree(made[0], tmp_path_factory.mktemp("reported") / "run"))
    return run, report(made[1], run)


@pytest.fixture(scope="module")
def page(reported) -> str:
    return reported[1].index_html.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def written(reported) -> dict:
    """report/summary.json as written."""
    return json.loads(reported[1].summary_json.read_text(encoding="utf-8"))


def _json(run: Path, rel: str) -> dict:
    return json.loads((run / rel).read_text(encoding="utf-8"))


@pytest.fixture
def no_ripple(run_dir, made):
    shutil.rmtree(run_dir / "ripple")
    return report(made[1], run_dir)


@pytest.fixture
def topk_run(run_dir, made) -> Path:
    """The run recoupled keeping each piece's 3 nearest neighbours (its ripple results are then stale: removed)."""
    shutil.rmtree(run_dir / "ripple")
    cfg = made[1].model_copy(deep=True)
    cfg.couple.top_k = 3
    couple(cfg, run_dir, show_progress=False)
    return run_dir


# ---------------------------------------------------------------- summary.json


def test_summary_has_the_nine_sections_in_order(written):
    assert SECTIONS == ("metadata", "knowledge_pieces", "gradient_analysis", "coupling_analysis", "high_coupling_pairs",
                        "cross_pot_analysis", "generated_files", "gpu_performance", "experiment_readiness")
    assert list(written) == list(SECTIONS)


def test_summary_file_is_the_returned_summary(reported, written):
    assert written == reported[1].summary


def test_summary_file_is_strict_json(reported):
    def refuse(name):
        raise AssertionError(f"non-finite number {name} in summary.json")

    json.loads(reported[1].summary_json.read_text(encoding="utf-8"), parse_constant=refuse)


def test_coupling_analysis_is_stats_json_plus_the_matrix_path(reported, written):
    assert written["coupling_analysis"] == {**_json(reported[0], "coupling/stats.json"), "matrix": "coupling/cosine.pt"}


def test_same_and_cross_question_figures_are_those_of_stats_json(reported, written):
    pairs, cp = _json(reported[0], "coupling/stats.json")["pairs"], written["cross_pot_analysis"]
    for key in ("same_question", "cross_question", "same_answer", "different_answer",
                "same_question_different_answer", "cross_question_different_answer"):
        assert cp[key] == pairs[key], key
    assert cp["difference"] == pytest.approx(pairs["same_question"]["mean"] - pairs["cross_question"]["mean"], abs=ATOL)


def test_question_coupling_is_the_mean_gradsim_among_each_questions_own_pieces(reported, written):
    cos = torch.load(reported[0] / "coupling/cosine.pt", weights_only=True)["cosine"].double()
    owners = [set(p["owners"]) for p in _json(reported[0], "gradients/manifest.json")["pieces"]]
    expected = {}
    for q in set().union(*owners):
        members = [k for k, own in enumerate(owners) if q in own]
        expected[q] = sum(float(cos[a, b]) for a, b in combinations(members, 2)) / (len(members) * (len(members) - 1) / 2)
    top = written["cross_pot_analysis"]["top_questions"]
    assert [t["question_id"] for t in top] == sorted(expected, key=lambda q: -expected[q])
    for t in top:
        assert t["gradsim"]["mean"] == pytest.approx(expected[t["question_id"]], abs=ATOL)


def test_piece_counts_are_those_of_the_manifest_and_pieces(written, reported):
    kp, recs = written["knowledge_pieces"], _json(reported[0], "gradients/manifest.json")["pieces"]
    assert kp["count"] == len(recs) == len(_pieces())
    assert kp["per_kind"] == dict(Counter(r["kind"] for r in recs))
    assert kp["n_questions"] == len({p.question_id for p in _pieces()})
    assert kp["with_counterfactual"] == sum(p.counterfactual is not None for p in _pieces())


def test_logprob_and_gradient_norm_summaries_are_those_of_the_manifest(written, reported):
    recs, ga = _json(reported[0], "gradients/manifest.json")["pieces"], written["gradient_analysis"]
    logprobs = [r["logprob"] for r in recs]
    norms = [sum(r["sq_norm"].values()) ** 0.5 for r in recs]
    assert ga["logprob_nats"]["mean"] == pytest.approx(sum(logprobs) / len(logprobs), abs=ATOL)
    assert (ga["logprob_nats"]["min"], ga["logprob_nats"]["max"]) == (min(logprobs), max(logprobs))
    assert ga["grad_norm"]["max"] == pytest.approx(max(norms), abs=ATOL)


def test_ripple_figures_are_those_of_ripple_summary(reported, written):
    rip, ready = _json(reported[0], "ripple/summary.json"), written["experiment_readiness"]
    assert ready["ripple_done"] is True
    for key in ("spearman_coupling", "spearman_first_order", "precision_at_k", "pooled", "n_edits"):
        assert ready[f"ripple_{key}"] == rip[key], key
    assert ready["ripple_success_rate"] == pytest.approx(rip["n_successful"] / rip["n_edits"], abs=ATOL)


def test_headline_is_read_from_stats_manifest_and_ripple_summary(reported):
    run, h = reported[0], reported[1].headline
    pairs, rip = _json(run, "coupling/stats.json")["pairs"], _json(run, "ripple/summary.json")
    assert set(Headline.model_fields) == {"n_pieces", "mean_gradsim", "same_question_mean", "cross_question_mean",
                                          "ripple_done", "ripple_spearman_coupling", "ripple_spearman_first_order", "gpu"}
    assert h.n_pieces == len(_json(run, "gradients/manifest.json")["pieces"])
    assert (h.mean_gradsim, h.same_question_mean, h.cross_question_mean) == (
        pairs["all"]["mean"], pairs["same_question"]["mean"], pairs["cross_question"]["mean"])
    assert h.ripple_done
    assert h.ripple_spearman_coupling == Interval.model_validate(rip["spearman_coupling"])
    assert h.ripple_spearman_first_order == Interval.model_validate(rip["spearman_first_order"])
    assert h.gpu == _json(run, "gradients/manifest.json")["timing"]["device"]["gpu"]


def test_every_file_of_the_run_is_listed_with_its_exact_size(reported, written):
    run = reported[0]
    on_disk = {Path(d, f).relative_to(run).as_posix(): os.path.getsize(Path(d, f))
               for d, _, names in os.walk(run) for f in names}
    section = written["generated_files"]
    assert {f["path"]: f["bytes"] for f in section["files"]} == on_disk
    assert {"report/index.html", "report/summary.json"} <= set(on_disk)
    assert (section["n_files"], section["total_bytes"]) == (len(on_disk), sum(on_disk.values()))


def test_the_report_directory_holds_exactly_the_two_outputs(reported):
    assert sorted(p.name for p in reported[1].out_dir.iterdir()) == ["index.html", "summary.json"]


def test_build_summary_lists_the_files_of_the_other_stages(reported):
    listed = {f["path"] for f in build_summary(reported[0])["generated_files"]["files"]}
    assert "coupling/cosine.pt" in listed and "ripple/summary.json" in listed
    assert not any(p.startswith("report/") for p in listed)


# ---------------------------------------------------------------- the page


def test_page_is_one_self_contained_file(page):
    assert "<script src=" not in page and "<link" not in page
    assert page.count(PLOTLY_BUNDLE) == 1


def test_page_has_the_three_figures(page):
    assert page.count(FIGURE_DIV) == 3
    for name in ("heatmap", "distribution", "ripple"):
        assert page.count(f'id="fig-{name}"') == 1, name


def test_piece_text_reaches_the_page_only_escaped(page):
    assert NASTY not in page
    assert str(escape(NASTY)) in page


def test_every_definition_is_listed_once(page):
    block = re.search(r'<dl class="defs">(.*?)</dl>', page, re.S).group(1)
    terms = Counter(re.findall(r"<dt>(.*?)</dt>", block))
    assert terms == Counter(str(escape(name)) for name in DEFINITIONS)
    for name, text in DEFINITIONS.items():
        assert f"<dd>{escape(text)}</dd>" in block, name


def test_without_ripple_the_page_says_so_and_has_two_figures(no_ripple):
    page = no_ripple.index_html.read_text(encoding="utf-8")
    assert "Ripple was not run" in page
    assert page.count(FIGURE_DIV) == 2 and 'id="fig-ripple"' not in page


def test_without_ripple_the_summary_names_the_next_step(no_ripple):
    ready = no_ripple.summary["experiment_readiness"]
    assert not ready["ripple_done"] and not no_ripple.headline.ripple_done
    assert ready["ripple_spearman_coupling"] is None and no_ripple.headline.ripple_spearman_coupling is None
    assert ready["next_step"].startswith("gradcouple ripple --run")


# ---------------------------------------------------------------- refusals


def _replace_cosine(run: Path) -> None:
    d = torch.load(run / "coupling/cosine.pt", weights_only=True)
    torch.save({"ids": d["ids"], "cosine": d["cosine"] * 0.5}, run / "coupling/cosine.pt")


def _edit_matrix_sha(run: Path) -> None:
    stats = _json(run, "coupling/stats.json")
    stats["matrix_sha256"] = "0" * 64
    (run / "coupling/stats.json").write_text(json.dumps(stats), encoding="utf-8")


@pytest.mark.parametrize("make_stale", [_edit_matrix_sha, _replace_cosine], ids=["stats-sha", "cosine-replaced"])
def test_stale_coupling_is_refused(run_dir, made, make_stale):
    make_stale(run_dir)
    with pytest.raises(ArtifactError, match="stale"):
        report(made[1], run_dir)


def test_stale_ripple_results_are_refused(run_dir, made):
    rip = _json(run_dir, "ripple/summary.json")
    rip["inputs"]["values"]["coupling"] = "f" * 64
    (run_dir / "ripple/summary.json").write_text(json.dumps(rip), encoding="utf-8")
    with pytest.raises(ArtifactError, match="stale"):
        report(made[1], run_dir)


@pytest.mark.parametrize("name", ["stats.json", "cosine.pt", "pairs.csv"])
def test_missing_coupling_file_is_named_with_the_command_that_makes_it(run_dir, made, name):
    (run_dir / "coupling" / name).unlink()
    with pytest.raises(ArtifactError) as err:
        report(made[1], run_dir)
    assert name in str(err.value) and "gradcouple couple --run" in str(err.value)


# ---------------------------------------------------------------- heatmap: order, cap, top-k


def test_heatmap_orders_pieces_by_question_then_hop(reported):
    fig, shown = heatmap(load_run(reported[0]), 200)
    assert shown == len(HEATMAP_ORDER)
    assert list(fig.layout.xaxis.ticktext) == HEATMAP_ORDER


def test_heatmap_cap_shows_the_first_pieces_only(reported):
    fig, shown = heatmap(load_run(reported[0]), 4)
    assert shown == 4 and list(fig.layout.xaxis.ticktext) == HEATMAP_ORDER[:4]
    assert len(fig.data[0].z) == 4 and all(len(row) == 4 for row in fig.data[0].z)


def test_heatmap_cap_is_noted_on_the_page(reported, written, made):
    cfg = made[1].model_copy(deep=True)
    cfg.report.max_heatmap = 4
    assert f"{len(HEATMAP_ORDER)} pieces exceed report.max_heatmap = 4" in render_html(reported[0], written, cfg)


def test_topk_heatmap_holds_only_the_kept_cells(topk_run):
    d = torch.load(topk_run / "coupling/topk.pt", weights_only=True)
    kept = {(d["ids"][i], d["ids"][j]): float(c) for i in range(len(d["ids"]))
            for j, c in zip(d["indices"][i].tolist(), d["cosine"][i].tolist())}
    fig, _ = heatmap(load_run(topk_run), 200)
    ids = list(fig.layout.xaxis.ticktext)
    cells = {(ids[a], ids[b]): v for a, row in enumerate(fig.data[0].z) for b, v in enumerate(row) if v is not None}
    assert cells.keys() == kept.keys()
    for key, v in cells.items():
        assert v == pytest.approx(kept[key], abs=HEATMAP_ROUNDING)


def test_topk_report_notes_the_blank_cells_and_names_the_topk_matrix(topk_run, made):
    res = report(made[1], topk_run)
    assert "Top-k coupling: only each piece" in res.index_html.read_text(encoding="utf-8")
    assert (res.summary["coupling_analysis"]["mode"], res.summary["coupling_analysis"]["matrix"]) == ("top3", "coupling/topk.pt")


def test_distribution_counts_each_pair_once_by_question(reported):
    pairs = _json(reported[0], "coupling/stats.json")["pairs"]
    fig = distribution(load_run(reported[0]))
    counted = {t.name.split(" (")[0]: int(sum(t.customdata)) for t in fig.data}
    assert counted == {"same question": pairs["same_question"]["n"], "cross question": pairs["cross_question"]["n"]}
