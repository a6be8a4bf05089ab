"""The ripple stage: edits restore the weights bit for bit, predictions equal autograd, the
summary carries the metrics it names, and ripple uses the extraction's own settings."""

from __future__ import annotations

import pytest
import torch
from conftest import random_pieces, tiny_gpt2, tiny_llama, write_fact_pieces

from gradcouple.config import RunConfig
from gradcouple.stages.couple import couple
from gradcouple.edits import (METHODS, EditContext, Rewrite, edited, ft_edit, method_class, restore, restored,
                              snapshot)
from gradcouple.errors import ArtifactError
from gradcouple.scoring import encode_pieces
from gradcouple.stages.extract import extract
from gradcouple.keys import keys_at
from gradcouple.layers import select_targets
from gradcouple.metrics import DEFINITIONS
from gradcouple.stages.ripple import choose_edits, ripple
from gradcouple.rundir import RunDir
from gradcouple.scoring import answer_logprob, collate, encode

BASELINE_ATOL = 1e-4  # nats: the unedited model re-scores the manifest's log-probs
WEIGHT_ATOL = 1e-5


def _run(tmp_path, loaded, store="factors", **ripple_kw) -> RunConfig:
    write_fact_pieces(tmp_path / "p.jsonl")
    cfg = RunConfig()
    cfg.data.pieces = tmp_path / "p.jsonl"
    cfg.model.name = "llama-tiny-random"
    cfg.model.layers = "all"
    cfg.extract.store = store
    cfg.extract.shard_size = 4
    cfg.ripple.hparams = {"ft": {"steps": 2}}
    for k, v in {"n_edits": 3, **ripple_kw}.items():
        setattr(cfg.ripple, k, v)
    extract(cfg, tmp_path / "run", loaded=loaded, show_progress=False)
    couple(cfg, tmp_path / "run", show_progress=False)
    return cfg


def test_dataset_counterfactuals_are_edited_first(tmp_path):
    pieces = write_fact_pieces(tmp_path / "p.jsonl")
    edits = choose_edits(pieces, 5, seed=0)
    assert [e.source for e in edits[:3]] == ["dataset"] * 3
    assert {pieces[e.index].id for e in edits if e.source == "dataset"} == {"facts:q1:0", "facts:q2:0", "facts:q3:1"}


def test_substitute_answers_differ_from_the_piece_and_skip_multi_hop(tmp_path):
    pieces = write_fact_pieces(tmp_path / "p.jsonl")
    for e in choose_edits(pieces, 8, seed=0):
        assert e.new_answer.casefold() != pieces[e.index].answer.casefold()
        assert pieces[e.index].kind.value != "multi_hop"


def test_edit_choice_is_seeded(tmp_path):
    pieces = write_fact_pieces(tmp_path / "p.jsonl")
    assert choose_edits(pieces, 5, seed=3) == choose_edits(pieces, 5, seed=3)


def test_ft_edit_then_restore_is_bit_exact(tiny_llama_loaded, tmp_path):
    model, tok = tiny_llama_loaded.model, tiny_llama_loaded.tokenizer
    targets = select_targets(model, "all")
    enc = encode_pieces(tok, write_fact_pieces(tmp_path / "p.jsonl"), RunConfig().data.prompt_template, 256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = snapshot(targets)
    deltas = ft_edit(model, targets, [enc[0]], steps=3, lr=1e-2)
    assert all(d.abs().max() > 0 for d in deltas.values())
    assert restore(targets, saved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_ft_edit_moves_bfloat16_weights_through_fp32_masters():
    model = tiny_llama().to(torch.bfloat16)
    targets = select_targets(model, "all")
    saved = snapshot(targets)
    deltas = ft_edit(model, targets, random_pieces(1, seed=2), steps=3, lr=1e-4)
    for d in deltas.values():
        assert torch.isfinite(d).all() and d.device.type == "cpu"
        assert (d != 0).float().mean() > 0.5
    assert restore(targets, saved)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_edits_inside_edited_and_restores_bit_for_bit_even_when_the_block_raises(method, tiny_llama_loaded):
    lm = tiny_llama_loaded
    model = lm.model
    targets = select_targets(model, "all")
    ctx = EditContext(model=model, targets=targets, pad_id=lm.pad_id, reader=None, tokenizer=lm.tokenizer,
                      covariance=lambda t: 1e-3 * torch.eye(t.d_in_aug, dtype=torch.float64), fingerprint="test:tiny-llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rewrite = [Rewrite(encode(lm.tokenizer, "The capital of France is", " Rome"), subject="France")]
    fast = {"ft": {"steps": 2}, "ft-l": {"num_steps": 2}}.get(method, {"v_num_grad_steps": 2,
                                                                       "context_template_length_params": [[5, 5]]})
    with pytest.raises(ZeroDivisionError):
        with edited(method_class(method).resolve(fast, model=model), ctx, rewrite) as delta:
            moved = [t.name for t in targets if not torch.equal(t.module.weight, before[f"{t.name}.weight"])]
            assert moved and all(float(delta[n].abs().max()) > 0 for n in moved)
            1 / 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_restored_raises_when_the_weights_cannot_be_put_back(monkeypatch):
    import gradcouple.edits.base as base

    targets = select_targets(tiny_llama(), "all")
    monkeypatch.setattr(base, "restore", lambda targets, saved: False)
    with pytest.raises(RuntimeError, match="could not be restored bit for bit"):
        with restored(targets):
            pass


def test_ripple_restores_every_edit_and_rescores_the_manifest(tmp_path, tiny_llama_loaded):
    cfg = _run(tmp_path, tiny_llama_loaded)
    s = ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False).summary
    assert s.n_edits == 3 and all(e.restored for e in s.edits)
    assert s.baseline_logprob_max_abs_diff_vs_manifest < BASELINE_ATOL


def test_asking_for_more_edits_than_the_pieces_allow_says_how_many_are_made(tmp_path, tiny_llama_loaded, caplog):
    cfg = _run(tmp_path, tiny_llama_loaded, n_edits=500)
    with caplog.at_level("WARNING", logger="gradcouple"):
        s = ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False).summary
    assert s.n_edits == 8  # every single-hop and cloze fact
    assert f"--n-edits 500: 8 pieces in {tmp_path / 'run'} can be edited, so 8 edits are made." in caplog.text


def test_ripple_edits_raise_the_new_answer(tmp_path, tiny_llama_loaded):
    cfg = _run(tmp_path, tiny_llama_loaded)
    s = ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False).summary
    assert all(e.logprob_new_after > e.logprob_new_before for e in s.edits)


def test_ripple_measures_every_other_piece_once_per_edit(tmp_path, tiny_llama_loaded):
    cfg = _run(tmp_path, tiny_llama_loaded)
    ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    _, rows = RunDir(tmp_path / "run").ripple.load()
    assert len(rows) == 3 * 9
    assert all(r.piece_id != r.edited_id for r in rows)


def test_coupling_prediction_follows_the_sign_of_gradsim(tmp_path, tiny_llama_loaded):
    cfg = _run(tmp_path, tiny_llama_loaded)
    s = ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False).summary
    _, rows = RunDir(tmp_path / "run").ripple.load()
    for e in s.edits:
        sign = 1 if e.first_order_self > 0 else -1
        mine = [r for r in rows if r.edited_id == e.piece_id and abs(r.cosine) > 1e-9]
        assert all((r.predicted_coupling * sign >= 0) == (r.cosine >= 0) for r in mine)


def test_ripple_summary_mean_rho_has_a_bootstrap_interval_around_it(tmp_path, tiny_llama_loaded):
    cfg = _run(tmp_path, tiny_llama_loaded, n_edits=4)
    s = ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False).summary
    rhos = [e.spearman_first_order for e in s.edits if e.spearman_first_order is not None]
    assert s.spearman_first_order.estimate == pytest.approx(sum(rhos) / len(rhos))
    assert s.spearman_first_order.low <= s.spearman_first_order.estimate <= s.spearman_first_order.high


def test_ripple_summary_quotes_the_definitions_it_uses(tmp_path, tiny_llama_loaded):
    cfg = _run(tmp_path, tiny_llama_loaded)
    s = ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False).summary
    assert {"Spearman's rho", "precision@k", "bootstrap interval", "coupling prediction"} <= set(s.definitions)
    assert all(DEFINITIONS[k] == v for k, v in s.definitions.items())


def test_ripple_with_rome_restores_and_raises_the_new_answer(tmp_path, tiny_llama_loaded):
    cfg = _run(tmp_path, tiny_llama_loaded, n_edits=2, method="rome")
    s = ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False).summary
    assert s.method == "rome" and all(e.restored for e in s.edits)
    assert all(e.logprob_new_after > e.logprob_new_before for e in s.edits)


def test_memit_with_the_pieces_covariance_needs_a_store_that_keeps_inputs(tmp_path, tiny_llama_loaded):
    cfg = _run(tmp_path, tiny_llama_loaded, store="dense", method="memit", covariance="pieces")
    with pytest.raises(ArtifactError, match="--store factors"):
        ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)


def test_ripple_takes_layers_and_template_from_the_run_not_the_callers_flags(tmp_path, tiny_llama_loaded):
    cfg = _run(tmp_path, tiny_llama_loaded, n_edits=1)
    other = cfg.model_copy(deep=True)
    other.model.layers = "last2"
    other.data.prompt_template = "Q: {question}\nA:"
    other.extract.max_length = 8
    s = ripple(other, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False).summary
    assert s.baseline_logprob_max_abs_diff_vs_manifest < BASELINE_ATOL
    assert s.edits[0].prompt.startswith("Question: ")


def test_pieces_answering_the_new_target_are_their_own_group(tmp_path, tiny_llama_loaded):
    from gradcouple.pieces import write_pieces

    pieces = write_fact_pieces(tmp_path / "p.jsonl")
    pieces = [p.model_copy(update={"counterfactual": "Paris" if p.id == "facts:q1:0" else None}) for p in pieces]
    write_pieces(tmp_path / "p.jsonl", pieces)
    cfg = RunConfig()
    cfg.data.pieces = tmp_path / "p.jsonl"
    cfg.model.name = "llama-tiny-random"
    cfg.ripple.n_edits, cfg.ripple.hparams = 1, {"ft": {"steps": 2}}
    extract(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    couple(cfg, tmp_path / "run", show_progress=False)
    s = ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False).summary
    _, rows = RunDir(tmp_path / "run").ripple.load()
    assert s.edits[0].piece_id == "facts:q1:0" and s.edits[0].target_answer_pieces == 2
    assert {r.piece_id for r in rows if r.target_answer} == {"facts:q2:0", "facts:q3:0"}
    assert s.pooled.n_points == 9 - 2
