"""The report page in a real browser. A demo-like run (plain multi-hop facts plus benchmark edits
with their test queries, as `make demo` mixes MuSiQue/HotpotQA with MQuAKE) is built with the tiny
random LLaMA, its page rendered in headless Chromium with no network, and the page's own
self-check (``#selftest``: it clicks the heatmap toggle and the pairs table's headers and writes
a JSON result into ``<pre id="selftest">``) is read back from the DOM."""

from __future__ import annotations

import time

import pytest

from gradcouple.config import RunConfig
from gradcouple.stages.couple import couple
from gradcouple.stages.extract import extract
from gradcouple.pieces import KnowledgePiece, PieceKind, PieceRole, Triple, write_pieces
from gradcouple.stages.report import report
from gradcouple.stages.report.browser import INSTALL_HINT, find_chromium, render_page
from gradcouple.stages.ripple import ripple

pytestmark = [pytest.mark.slow, pytest.mark.skipif(find_chromium() is None, reason=f"headless Chromium is not installed; "
                                                                                   f"install it with `{INSTALL_HINT}`")]

FIGURES = {"fig-heatmap", "fig-distribution", "fig-layers", "fig-ripple"}
SCREEN = (1280, 3000)


def _facts() -> list[KnowledgePiece]:
    """Three two-hop questions: each hop and the whole question."""
    rows = [("q1", "Who wrote Hamlet?", "William Shakespeare", "In which town was William Shakespeare born?",
             "Stratford-upon-Avon", "In which town was the author of Hamlet born?"),
            ("q2", "What is the capital of France?", "Paris", "Which river flows through Paris?", "the Seine",
             "Which river flows through the capital of France?"),
            ("q3", "Who painted the Mona Lisa?", "Leonardo da Vinci", "Where was Leonardo da Vinci born?", "Vinci",
             "Where was the painter of the Mona Lisa born?")]
    out = []
    for q, p0, a0, p1, a1, pq in rows:
        for hop, kind, prompt, answer in ((0, PieceKind.single_hop, p0, a0), (1, PieceKind.single_hop, p1, a1),
                                          (None, PieceKind.multi_hop, pq, a1)):
            out.append(KnowledgePiece(id=f"facts:{q}:{'q' if hop is None else hop}", dataset="facts", question_id=q,
                                      hop=hop, kind=kind, prompt=prompt, answer=answer))
    return out


def _edits() -> list[KnowledgePiece]:
    """Two benchmark edits of 'The country of S is', each with its original and three test queries."""
    out = []
    for i, (subj, new, true) in enumerate([("Mount Fuji", "Kenya", "Japan"), ("the Danube", "Peru", "Germany")]):
        eid, prompt = f"bench:{i}:edit", f"The name of the country of {subj} is"
        out += [KnowledgePiece(id=eid, dataset="bench", question_id=str(i), kind=PieceKind.cloze, prompt=prompt, answer=new,
                               role=PieceRole.edit, answer_before=true,
                               triple=Triple(subject=subj, relation="COUNTRY", object=new)),
                KnowledgePiece(id=f"bench:{i}:original", dataset="bench", question_id=str(i), kind=PieceKind.cloze, prompt=prompt,
                               answer=true, role=PieceRole.original, edit_id=eid, counterfactual=new)]
        for j, (rel, ans) in enumerate([("capital", "Nairobi"), ("currency", "shilling"), ("language", "Swahili")]):
            out += [KnowledgePiece(id=f"bench:{i}:condition{j}", dataset="bench", question_id=str(i), kind=PieceKind.cloze,
                                   prompt=f"The {rel} of {new} is", answer=f"{ans}{i}", role=PieceRole.condition, edit_id=eid),
                    KnowledgePiece(id=f"bench:{i}:test{j}", dataset="bench", question_id=str(i), kind=PieceKind.cloze,
                                   prompt=f"The {rel} of the country of {subj} is", answer=f"{ans}{i}", role=PieceRole.test,
                                   edit_id=eid, criterion="Compositionality_I" if j < 2 else "Logical_Generalization",
                                   condition_id=f"bench:{i}:condition{j}")]
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """(report page, Rendered of its #selftest load, screenshot path, seconds to build the run)."""
    root = tmp_path_factory.mktemp("browser")
    write_pieces(root / "pieces.jsonl", _facts() + _edits())
    cfg = RunConfig()
    cfg.data.pieces = root / "pieces.jsonl"
    cfg.model.name = "llama-tiny-random"
    cfg.ripple.hparams = {"ft": {"steps": 5, "lr": 1e-2}}
    cfg.ripple.covariance_tokens, cfg.ripple.bootstrap_resamples = 2000, 50
    t0 = time.perf_counter()
    extract(cfg, root / "run", show_progress=False)
    couple(cfg, root / "run", show_progress=False)
    assert ripple(cfg, root / "run", show_progress=False).summary.mode == "benchmark"
    page = report(cfg, root / "run").index_html
    shot = root / "report.png"
    return page, render_page(page, fragment="selftest", screenshot=shot, size=SCREEN), shot, time.perf_counter() - t0


@pytest.fixture(scope="module")
def selftest(rendered) -> dict:
    result = rendered[1].selftest
    assert result is not None, "the page's self-check wrote no result:\n" + "\n".join(rendered[1].console)
    return result


def test_the_page_logs_no_error(rendered, selftest):
    assert selftest["errors"] == []
    assert not [line for line in rendered[1].console if "Uncaught" in line or "rror" in line]


def test_plotly_loaded_offline_and_every_figure_drew_its_data(selftest):
    assert selftest["plotly"] and selftest["plots_ready"]
    assert set(selftest["figures"]) == FIGURES
    for name, fig in selftest["figures"].items():
        assert fig["rendered"] and fig["traces"] > 0 and fig["nonzero"] > 0, (name, fig)


def test_the_heatmap_toggle_switches_to_the_clustering_order_and_back(selftest):
    hm = selftest["heatmap"]
    assert hm["n"] == len(_facts()) + len(_edits())
    assert hm["orders_differ"], "clustering gave question order: the toggle cannot be seen to work on this run"
    assert hm["changed"] and hm["is_cluster_order"] and hm["pressed"] == "true" and hm["restored"]


def test_the_pairs_table_sorts_both_ways(selftest):
    s = selftest["sort"]
    assert s["rows"] > 2
    assert (s["first"], s["second"]) == ("descending", "ascending")
    assert s["first_sorted"] and s["second_sorted"] and s["order_changed"] and s["rank_sorted"]


def test_the_pairs_table_filters_by_the_same_question_rule(selftest):
    f = selftest["filter"]
    assert f["all_same_question"] and f["count_text"].startswith(f"{f['same_question_rows']} of ")


def test_a_screenshot_is_saved(rendered):
    shot = rendered[2]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(shot.read_bytes()[16:20], "big"), int.from_bytes(shot.read_bytes()[20:24], "big")
    assert (width, height) == SCREEN


@pytest.mark.parametrize("width, height", [(1280, 800), (1920, 1080)])
def test_the_verdict_and_the_ripple_table_are_on_the_first_screen_and_no_table_is_cut_off(rendered, width, height,
                                                                                          tmp_path):
    """At 1,400 px the per-edit and model tables were cut off and the ripple answer sat ~9,000 px down."""
    shot = tmp_path / f"report-{width}.png"
    layout = render_page(rendered[0], fragment="selftest", screenshot=shot, size=(width, height)).selftest["layout"]
    screen_width, screen_height = layout["viewport"]  # the window less headless Chromium's own bars
    assert screen_width == width and layout["page_width"] <= width
    assert layout["answer_bottom"] <= screen_height and layout["glance_bottom"] <= screen_height, layout
    assert layout["cut_off"] == [], layout
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_ripple_answer_is_on_the_rendered_page(rendered):
    assert "Does coupling predict ripple here?" in rendered[1].dom
    assert "pooled Spearman's rho between GradSim and the measured rise" in rendered[1].dom
