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
from gradcouple.stages.couple import couple
from gradcouple.errors import ArtifactError
from gradcouple.stages.extract import extract
from gradcouple.metrics import DEFINITIONS, Interval
from gradcouple.pieces import KnowledgePiece, PieceKind, write_pieces
from gradcouple.stages.report import SECTIONS, Headline, build_summary, load_run, open_in_browser, render_html, report
from gradcouple.stages.report.figures import best_partner, cluster_order, distribution, heatmap, heatmap_cells, layer_chart
from gradcouple.stages.ripple import ripple
from gradcouple.rundir import RunDir

ATOL = 1e-12  # float64 sums of the same numbers in another order
HEATMAP_ROUNDING = 5e-5  # heatmap cells are rounded to 4 decimals
FLOAT32 = 1e-5  # block products are float32 sums: another block size rounds differently
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
    cfg.ripple.hparams = {"ft": {"steps": 2}}
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
    rip, ready = json.loads(RunDir(reported[0]).ripple.latest().summary_path.read_text()), written["experiment_readiness"]
    assert ready["ripple_done"] is True
    for key in ("spearman_coupling", "spearman_first_order", "precision_at_k", "pooled", "n_edits"):
        assert ready[f"ripple_{key}"] == rip[key], key
    assert ready["ripple_success_rate"] == pytest.approx(rip["n_successful"] / rip["n_edits"], abs=ATOL)


def test_headline_is_read_from_stats_manifest_and_ripple_summary(reported):
    run, h = reported[0], reported[1].headline
    pairs, rip = _json(run, "coupling/stats.json")["pairs"], json.loads(RunDir(run).ripple.latest().summary_path.read_text())
    assert set(Headline.model_fields) == {"n_pieces", "mode", "mean_gradsim", "same_question_mean", "cross_question_mean",
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
    assert "coupling/cosine.pt" in listed and RunDir(reported[0]).relative(RunDir(reported[0]).ripple.latest().summary_path) in listed
    assert not any(p.startswith("report/") for p in listed)


# ---------------------------------------------------------------- the page


def test_page_is_one_self_contained_file(page):
    assert "<script src=" not in page and "<link" not in page
    assert page.count(PLOTLY_BUNDLE) == 1


def test_page_has_the_four_figures(page):
    assert page.count(FIGURE_DIV) == 4
    for name in ("heatmap", "distribution", "layers", "ripple"):
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
    assert page.count(FIGURE_DIV) == 3 and 'id="fig-ripple"' not in page


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


def test_stale_ripple_results_are_left_out_and_named_with_what_redoes_them(run_dir, made):
    latest = RunDir(run_dir).ripple.latest()
    rip = json.loads(latest.summary_path.read_text())
    rip["inputs"]["values"]["coupling"] = "f" * 64
    latest.summary_path.write_text(json.dumps(rip), encoding="utf-8")
    res = report(made[1], run_dir)
    ready = res.summary["experiment_readiness"]
    assert not ready["ripple_done"] and ready["ripple_results"] == []
    assert ready["stale_ripple_results"][0]["name"] == latest.name
    assert ready["stale_ripple_results"][0]["changed"][0].startswith("coupling matrix (sha256): ffffffff -> ")
    assert ready["next_step"] == f"rerun `gradcouple ripple --run {run_dir}` with each method to redo them"
    assert f"Left out, made from another coupling: <code>{latest.name}</code>" in res.index_html.read_text()


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


def test_heatmap_cap_shows_the_pieces_of_the_most_coupled_pairs(reported):
    cos = torch.load(reported[0] / "coupling/cosine.pt", weights_only=True)
    ids, c = cos["ids"], cos["cosine"].double()
    pairs = sorted(((float(c[a, b]), a, b) for a, b in combinations(range(len(ids)), 2)), reverse=True)
    first: list[str] = []
    for _, a, b in pairs:  # pieces in the order they first appear among the pairs, most coupled first
        first += [ids[k] for k in (a, b) if ids[k] not in first]
    fig, shown = heatmap(load_run(reported[0]), 4)
    assert shown == 4 and set(fig.layout.xaxis.ticktext) == set(first[:4])
    assert list(fig.layout.xaxis.ticktext) == [i for i in HEATMAP_ORDER if i in first[:4]]
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
    assert counted == {"same question": pairs["same_question"]["n"], "cross question": pairs["cross_question"]["n"],
                       "same answer": pairs["same_answer"]["n"]}


# ---------------------------------------------------------------- heatmap order toggle


def test_heatmap_carries_both_orders_as_permutations(reported):
    fig, shown = heatmap(load_run(reported[0]), 200)
    orders = fig.layout.meta["orders"]
    assert orders["question"] == list(range(shown))
    assert sorted(orders["cluster"]) == list(range(shown))


def test_cluster_order_is_scipy_average_linkage_on_one_minus_gradsim(reported):
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    r = load_run(reported[0])
    fig, _ = heatmap(r, 200)
    assert list(fig.layout.xaxis.ticktext) == HEATMAP_ORDER
    recs = {p.id: k for k, p in enumerate(r.records)}
    cells = torch.tensor(heatmap_cells(r, [recs[i] for i in HEATMAP_ORDER]), dtype=torch.float64)
    d = (1 - (cells + cells.t()) / 2).clamp(0, 2).fill_diagonal_(0).numpy()
    expected = leaves_list(linkage(squareform(d, checks=False), method="average", optimal_ordering=True)).tolist()
    assert fig.layout.meta["orders"]["cluster"] == expected


def test_cluster_order_groups_two_blocks():
    z = [[1, .9, 0, 0], [.9, 1, 0, 0], [0, 0, 1, .8], [0, 0, .8, 1]]
    z = [z[k] for k in (0, 2, 1, 3)]
    z = [[row[k] for k in (0, 2, 1, 3)] for row in z]
    order = cluster_order(z)
    assert {frozenset(order[:2]), frozenset(order[2:])} == {frozenset({0, 2}), frozenset({1, 3})}


def test_heatmap_hover_names_both_pieces_prompt_answer_and_gradsim(reported):
    fig, _ = heatmap(load_run(reported[0]), 200)
    tpl = fig.data[0].hovertemplate
    assert "%{x}" in tpl and "%{y}" in tpl and "%{z" in tpl
    hamlet = next(lab for lab in fig.data[0].x if "toy:q1:0" in lab)
    assert "Who wrote Hamlet?" in hamlet and "William Shakespeare" in hamlet


def test_best_partner_is_each_pieces_most_coupled_other_piece(reported):
    r = load_run(reported[0])
    v, j = best_partner(r)
    c = r.cosine.double().clone()
    c.fill_diagonal_(-2)
    assert torch.equal(j, c.argmax(1)) and torch.allclose(v, c.max(1).values, atol=ATOL)


# ---------------------------------------------------------------- per-layer contributions


def _layer_grams(run: Path, cfg: RunConfig) -> tuple[list[str], list[torch.Tensor], torch.Tensor]:
    """Each target's own Gram (pieces.jsonl order), computed as separate one-target Gram products, and the whole Gram."""
    from gradcouple.gram import gram_matrix, plan_methods
    from gradcouple.stores import GradientReader

    reader = GradientReader(RunDir(run))
    methods = plan_methods(reader, cfg.couple.method, cfg.couple.block_size)
    grams = [gram_matrix(reader, 3, {n: methods[n]}) for n in reader.names]
    return reader.names, grams, torch.load(run / "coupling/gram.pt", weights_only=True)["gram"].double()


def test_layer_grams_add_up_to_the_gram(reported, made):
    _, grams, G = _layer_grams(reported[0], made[1])
    assert torch.allclose(sum(grams), G, rtol=FLOAT32, atol=FLOAT32 * float(G.abs().max()))


def test_layer_contributions_of_the_top_pairs_are_the_layer_grams_over_the_norms(reported, made):
    names, grams, G = _layer_grams(reported[0], made[1])
    lc = _json(reported[0], "coupling/stats.json")["layers"]
    pairs = _json_lines_csv(reported[0] / "coupling/pairs.csv")
    ids = [p.id for p in load_run(reported[0]).records]
    norms = G.diagonal().sqrt()
    assert lc["names"] == names
    assert [(p["id_a"], p["id_b"]) for p in lc["top_pairs"]] == [(p["id_a"], p["id_b"]) for p in pairs[:20]]
    for p in lc["top_pairs"]:
        i, j = ids.index(p["id_a"]), ids.index(p["id_b"])
        expected = [float(g[i, j] / (norms[i] * norms[j])) for g in grams]
        assert p["contribution"] == pytest.approx(expected, abs=FLOAT32)
        assert sum(p["contribution"]) == pytest.approx(p["cosine"], abs=FLOAT32)


def test_mean_layer_contributions_average_every_pair(reported, made):
    names, grams, G = _layer_grams(reported[0], made[1])
    lc = _json(reported[0], "coupling/stats.json")["layers"]
    norms = G.diagonal().sqrt()
    n = len(norms)
    i, j = torch.triu_indices(n, n, offset=1)
    per = [g[i, j] / (norms[i] * norms[j]) for g in grams]
    assert lc["n_pairs"] == n * (n - 1) // 2
    assert lc["mean_contribution"] == pytest.approx([float(c.mean()) for c in per], abs=FLOAT32)
    assert lc["mean_abs_contribution"] == pytest.approx([float(c.abs().mean()) for c in per], abs=FLOAT32)
    assert sum(lc["abs_share"]) == pytest.approx(1.0, abs=ATOL)
    mean_gradsim = _json(reported[0], "coupling/stats.json")["pairs"]["all"]["mean"]
    assert sum(lc["mean_contribution"]) == pytest.approx(mean_gradsim, abs=FLOAT32)


def test_topk_coupling_keeps_the_layer_averages_of_every_pair(topk_run, made, reported):
    full = _json(reported[0], "coupling/stats.json")["layers"]
    topk = _json(topk_run, "coupling/stats.json")["layers"]
    assert topk["n_pairs"] == full["n_pairs"]
    assert topk["mean_contribution"] == pytest.approx(full["mean_contribution"], abs=FLOAT32)


def test_layer_chart_stacks_one_trace_per_target(reported):
    r = load_run(reported[0])
    fig = layer_chart(r)
    assert [t.name for t in fig.data] == r.stats.layers.names
    assert len(fig.data[0].x) == 1 + len(r.stats.layers.top_pairs)


def test_stats_without_layer_parts_still_load_and_the_page_says_how_to_add_them(run_dir, made):
    stats = _json(run_dir, "coupling/stats.json")
    del stats["layers"]
    (run_dir / "coupling/stats.json").write_text(json.dumps(stats), encoding="utf-8")
    page = report(made[1], run_dir).index_html.read_text(encoding="utf-8")
    assert "no per-layer parts" in page and 'id="fig-layers"' not in page


def _json_lines_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- headline, tables, config


def test_headline_answers_whether_coupling_predicts_ripple_with_its_interval(reported, written, page):
    rip = json.loads(RunDir(reported[0]).ripple.latest().summary_path.read_text())
    ans = written["experiment_readiness"]["coupling_predicts_ripple"]
    iv = rip["spearman_coupling"]
    assert ans["estimate"]["estimate"] == iv["estimate"]
    low, high = iv["low"], iv["high"]
    expected = ("undetermined" if low is None else "yes" if low > 0 else "reversed" if high < 0 else "not detectably")
    assert ans["answer"] == expected
    line = re.search(r'<p class="answer[^"]*" id="answer">(.*?)</p>', page, re.S).group(1)
    assert "Does coupling predict ripple here?" in line
    assert f"{iv['estimate']:.3f}" in line
    if low is not None:
        assert f"[{low:.3f}, {high:.3f}]" in line


def test_without_ripple_the_headline_says_it_was_not_measured(no_ripple):
    page = no_ripple.index_html.read_text(encoding="utf-8")
    assert no_ripple.summary["experiment_readiness"]["coupling_predicts_ripple"] is None
    assert "Not measured: ripple was not run" in page


def test_headline_panel_shows_the_run_at_a_glance(page, written):
    panel = re.search(r'<section id="headline".*?</section>', page, re.S).group(0)
    for label in ("model", "|θ| target parameters", "pieces", "questions", "datasets", "device", "pieces/s",
                  "peak memory", "bytes on disk", "wall time per stage"):
        assert f">{escape(label)}<" in panel, label
    assert f"{written['gradient_analysis']['n_params']:,}" in panel
    for stage in ("extract", "couple", "ripple"):
        assert f"<td>{stage} <b>" in panel


def test_pairs_table_holds_every_row_of_pairs_csv_with_sort_keys(reported, page):
    rows = _json_lines_csv(reported[0] / "coupling/pairs.csv")
    table = re.search(r'<table class="pair sortable" id="pairs-table">(.*?)</table>', page, re.S).group(1)
    body = table.split("<tbody>", 1)[1]
    assert body.count("<tr ") == len(rows)
    for row in rows:
        assert f'data-v="{float(row["cosine"])!r}"' in body


def test_config_and_versions_are_collapsible(page, made):
    details = re.search(r'<details id="config-details">(.*?)</details>', page, re.S).group(1)
    assert str(escape('"max_heatmap": 200')) in details and "plotly" in details and "torch" in details


def test_page_embeds_its_own_script_and_no_external_resource(page):
    assert page.count("gradcoupleReport") == 1
    head, rest = page.split(PLOTLY_BUNDLE, 1)
    own = head + rest.split("</script>", 1)[1]  # the page without the plotly.js library's source
    assert not re.search(r'(src|href)="(https?:)?//', own)


# ---------------------------------------------------------------- report --open


class _Browser:
    def __init__(self):
        self.opened = []

    def open(self, url, *args, **kwargs):
        self.opened.append(url)
        return True


def test_open_uses_the_default_browser(reported, monkeypatch):
    import webbrowser

    browser = _Browser()
    monkeypatch.setattr(webbrowser, "get", lambda *a: browser)
    assert open_in_browser(reported[1].index_html)
    assert browser.opened == [reported[1].index_html.resolve().as_uri()]


def test_open_without_a_browser_opens_nothing(reported, monkeypatch):
    import webbrowser

    def none(*a):
        raise webbrowser.Error("could not locate runnable browser")

    monkeypatch.setattr(webbrowser, "get", none)
    assert not open_in_browser(reported[1].index_html)


def test_open_refuses_a_console_browser(reported, monkeypatch):
    import webbrowser

    monkeypatch.delenv("BROWSER", raising=False)
    monkeypatch.setattr(webbrowser, "get", lambda *a: webbrowser.GenericBrowser("lynx"))
    assert not open_in_browser(reported[1].index_html)


def test_cli_open_says_where_the_page_is_without_a_browser(run_dir, monkeypatch):
    import webbrowser

    from typer.testing import CliRunner

    from gradcouple.cli.app import app

    def none(*a):
        raise webbrowser.Error("no browser")

    monkeypatch.setattr(webbrowser, "get", none)
    res = CliRunner().invoke(app, ["report", "--run", str(run_dir), "--open"])
    assert res.exit_code == 0, res.output
    assert "no graphical browser here" in res.output and (run_dir / "report/index.html").resolve().as_uri() in res.output


def test_the_verdict_is_not_yes_when_a_baseline_predicts_as_well():
    from gradcouple.metrics import Interval
    from gradcouple.stages.report.summary import verdict

    g = Interval(estimate=0.94, low=0.62, high=1.0, n=10)
    assert verdict(g) == "yes"
    assert verdict(g, [Interval(estimate=0.95, low=0.70, high=1.0, n=10)]) == "not beyond a baseline"
    assert verdict(g, [Interval(estimate=0.10, low=-0.5, high=0.6, n=10)]) == "yes"
    assert verdict(Interval(estimate=0.1, low=-0.2, high=0.4, n=10)) == "not detectably"
    assert verdict(Interval(estimate=-0.5, low=-0.8, high=-0.2, n=10)) == "reversed"
    assert verdict(Interval(estimate=0.5, low=None, high=None, n=2)) == "undetermined"


def test_a_large_heatmap_labels_its_questions_instead_of_nothing():
    """At N = 145 the heatmap had no labels at all."""
    from gradcouple.stages.report.figures import MAX_TICK_LABELS, tick_texts

    ids = [f"q{k // 4}:{k % 4}" for k in range(145)]
    qids = [f"q{k // 4}" for k in range(145)]
    ticks = tick_texts(ids, qids)
    assert len(ticks) == 145 and ticks[0] == "q0" and ticks[4] == "q1" and ticks[1] == ""
    assert len([t for t in ticks if t]) == 37 <= MAX_TICK_LABELS
    assert tick_texts(ids[:10], qids[:10]) == ids[:10]  # few pieces: each piece's id
    many = tick_texts([str(k) for k in range(400)], [f"q{k}" for k in range(400)])
    assert 0 < len([t for t in many if t]) <= MAX_TICK_LABELS


def test_the_model_source_is_shown_by_name_not_by_one_machines_path(tmp_path):
    from gradcouple.stages.report.page import source_name

    f = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    f.write_bytes(b"")
    assert source_name(str(f)) == f.name
    assert source_name("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert source_name("random init (seed 0) with a byte-level tokenizer").startswith("random init")
