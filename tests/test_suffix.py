"""Suffix execution is exact: log-probs from blocks L..end on the stored residual equal the full
model's to 1e-5 nats (float32) for every architecture family layers.py names, with right and left
padding, rotary and absolute positions and sliding windows; the blocks below L are really skipped;
a changed weight below L empties the cache; edits and whole benchmark ripples give the same results."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers as T
from conftest import VOCAB, random_pieces
from test_benchmark import coupled_edit_run

from gradcouple.edits.base import EditContext, Rewrite
from gradcouple.edits.value import PrefixKV, Prompts, optimise_value, templated_prompts
from gradcouple.layers import REGISTRY, find_blocks, select_targets
from gradcouple.scoring import EncodedPiece, collate, encode, measure_logprobs
from gradcouple.stages.ripple import ripple
from gradcouple.suffix import SuffixExecution, lowest_block, suffix_execution

TOL = 1e-5
_C = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
          max_position_embeddings=64)
_KV = dict(_C, num_key_value_heads=2)
_HD = dict(_KV, head_dim=8)
#: model_type -> (config class, model class, config); sliding windows (4 tokens) shorter than the sequences (up to 20)
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, _KV),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(_KV, sliding_window=4)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(_KV, use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, _HD),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, _HD),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(_HD, sliding_window=4)),
    "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(_HD, sliding_window=4, sliding_window_pattern=2)),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(_KV, pad_token_id=0, eos_token_id=1, bos_token_id=1)),
    "olmo": (T.OlmoConfig, T.OlmoForCausalLM, dict(_C, pad_token_id=0, eos_token_id=1)),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, dict(_C, pad_token_id=0, eos_token_id=1)),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                                  bos_token_id=1, eos_token_id=1)),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(_C, bos_token_id=1, eos_token_id=1)),
    "gptj": (T.GPTJConfig, T.GPTJForCausalLM, dict(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                                  rotary_dim=4, bos_token_id=1, eos_token_id=1)),
    "opt": (T.OPTConfig, T.OPTForCausalLM, dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=4,
                                                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                                pad_token_id=0, bos_token_id=1, eos_token_id=1)),
    "falcon": (T.FalconConfig, T.FalconForCausalLM, dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                                                         num_attention_heads=4, bos_token_id=1, eos_token_id=1)),
    "bloom": (T.BloomConfig, T.BloomForCausalLM, dict(vocab_size=VOCAB, hidden_size=32, n_layer=4, n_head=4,
                                                      bos_token_id=1, eos_token_id=1, pad_token_id=0)),
    "phi": (T.PhiConfig, T.PhiForCausalLM, dict(_C, bos_token_id=1, eos_token_id=1)),
}


def tiny(family: str) -> torch.nn.Module:
    cfg_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**kw)).eval().requires_grad_(False)


def test_every_registered_family_is_tested():
    assert set(REGISTRY) - {"gemma3"} <= set(FAMILIES)  # gemma3 (multimodal) wraps gemma3_text's blocks


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_suffix_logprobs_equal_the_full_model(family):
    model = tiny(family)
    assert model.config.model_type == family
    pieces = random_pieces(24, seed=3, max_len=20)
    full = measure_logprobs(model, pieces, batch_size=8)
    for block in (1, 3):
        with SuffixExecution(model, block) as sx:
            first = measure_logprobs(model, pieces, batch_size=8)   # residuals computed
            again = measure_logprobs(model, pieces, batch_size=5)   # reused, in other batches
        assert float((first - full).abs().max()) <= TOL and float((again - full).abs().max()) <= TOL
        assert sx.stats.rows_computed == 24 and sx.stats.rows_reused == 24 and sx.stats.full_calls == 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "bloom"])
def test_left_padding_gives_the_full_models_hidden_states(family):
    model = tiny(family)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, VOCAB, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    for b, pad in enumerate((0, 3, 7, 1)):
        mask[b, :pad] = 0
    full = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    with SuffixExecution(model, 2):
        model.base_model(input_ids=ids[[1, 3]], attention_mask=mask[[1, 3]], use_cache=False)  # some rows computed apart
        got = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    real = mask.bool()
    assert torch.allclose(got[real], full[real], atol=1e-5, rtol=1e-5)


def _value_prompts(seed: int) -> Prompts:
    """Four rewrite rows (lookup tokens inside their prompts, one the last prompt token as fact_token 'last'
    gives) and a KL row whose lookup is its first token, so its prefix is padding alone."""
    g = torch.Generator().manual_seed(seed)
    enc, look = [], []
    for n in (9, 14, 20, 6):
        ids = torch.randint(2, VOCAB, (n,), generator=g).tolist()
        enc.append(EncodedPiece(tuple(ids), n - 2, "p", "a"))
        look.append(n - 3 if n == 14 else int(torch.randint(1, n - 3, (1,), generator=g)))
    return Prompts(enc, look, torch.randint(2, VOCAB, (5,), generator=g).tolist(), 0, True)


#: ALiBi instead of rotary positions (falcon's other variant), besides every family
VALUE_FAMILIES = {**{f: FAMILIES[f] for f in FAMILIES},
                  "falcon-alibi": (T.FalconConfig, T.FalconForCausalLM, dict(FAMILIES["falcon"][2], alibi=True))}


@pytest.mark.parametrize("family", sorted(VALUE_FAMILIES))
@pytest.mark.parametrize("site", ["block", "mlp_out"])  # MEMIT's site, ROME's (the edited projection)
def test_the_value_optimisation_from_the_lookup_token_equals_whole_prompts(family, site):
    cfg_cls, model_cls, kw = VALUE_FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kw)).eval().requires_grad_(False)
    block = find_blocks(model)[1][1]
    module = block if site == "block" else next(t.module for t in select_targets(model, "all") if t.block == 1)
    prompts, width = _value_prompts(7), model.get_input_embeddings().weight.shape[1]
    rows = [list(e.ids[:e.n_inputs]) for e in prompts.encoded] + [prompts.kl_ids]
    prefix = PrefixKV(model, rows, list(prompts.lookup) + [prompts.kl_lookup], 0, "cpu")
    assert prefix.usable  # the test below compares the cached path, not a fallback
    got = {}
    for cached in (False, True):
        ctx = EditContext(model=model, targets=[], pad_id=0, reader=None, covariance=None, prefix_cache=cached)
        with SuffixExecution(model, 1):  # as in a ripple: the base model's forward is patched
            got[cached] = optimise_value(ctx, module, width, prompts, 5, 0.5, 0.0625, 1e-3, 4.0)
    (init, delta, trace), (init_c, delta_c, trace_c) = got[False], got[True]
    assert trace["steps"] == trace_c["steps"] == 4 and abs(trace["loss"] - trace_c["loss"]) <= TOL
    assert float((init - init_c).norm()) <= TOL * float(init.norm())
    assert float((delta - delta_c).norm()) <= 1e-4 * float(delta.norm()) and float(delta.norm()) > 0


def test_the_blocks_below_L_are_not_run_on_reuse():
    model = tiny("llama")
    pieces = random_pieces(6, seed=1)
    full = measure_logprobs(model, pieces)
    with SuffixExecution(model, 3):
        measure_logprobs(model, pieces)
        blocks = find_blocks(model)[1]
        calls = []
        for b in blocks[:3]:
            b.register_forward_hook(lambda *a: calls.append(1))  # a hook below L: that call runs whole
        got_whole = measure_logprobs(model, pieces)
        for b in blocks[:3]:
            b._forward_hooks.clear()
            b.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("block below L was run"))
        got = measure_logprobs(model, pieces)
        for b in blocks[:3]:
            del b.forward
    assert calls and torch.allclose(got_whole, full, atol=TOL, rtol=0) and torch.allclose(got, full, atol=TOL, rtol=0)


def test_a_changed_weight_below_L_empties_the_cache_and_one_above_does_not():
    model = tiny("gpt2")
    pieces = random_pieces(8, seed=2)
    blocks = find_blocks(model)[1]
    with SuffixExecution(model, 2) as sx:
        measure_logprobs(model, pieces)
        with torch.no_grad():
            blocks[3].mlp.c_proj.weight.mul_(1.5)        # above L: the residuals stay valid
        above = measure_logprobs(model, pieces)
        assert sx.stats.invalidated == 0 and sx.stats.rows_computed == 8
        with torch.no_grad():
            blocks[0].mlp.c_proj.weight.mul_(1.5)        # below L: recomputed
        below = measure_logprobs(model, pieces)
        assert sx.stats.invalidated == 1 and sx.stats.rows_computed == 16
    with torch.no_grad():
        blocks[0].mlp.c_proj.weight.div_(1.5)
    ref_above = measure_logprobs(model, pieces)
    with torch.no_grad():
        blocks[0].mlp.c_proj.weight.mul_(1.5)
    assert torch.allclose(above, ref_above, atol=TOL, rtol=0)
    assert torch.allclose(below, measure_logprobs(model, pieces), atol=TOL, rtol=0)


def test_calls_it_cannot_serve_run_whole_and_the_model_is_left_as_it_was():
    model = tiny("llama")
    base_forward = model.base_model.forward
    with SuffixExecution(model, 2) as sx:
        ids = torch.randint(0, VOCAB, (2, 6))
        out = model.base_model(input_ids=ids, use_cache=True)           # a KV cache: whole
        gen = model.generate(ids, max_new_tokens=3, do_sample=False)    # generation: whole
        with sx.bypassed():                                               # a one-off pass: whole, nothing kept
            measure_logprobs(model, random_pieces(3))
        assert sx.stats.rows_computed == 0 and sx.n_bytes == 0
    assert sx.stats.full_calls >= 2 and sx.stats.suffix_calls == 0 and out.last_hidden_state.shape == (2, 6, 32)
    assert gen.shape == (2, 9) and "forward" not in vars(model.base_model)
    assert all("forward" not in vars(b) for b in find_blocks(model)[1]) and sx.n_bytes == 0


def test_a_memory_bound_drops_old_rows_and_stays_exact():
    model = tiny("llama")
    pieces = random_pieces(16, seed=4)
    full = measure_logprobs(model, pieces)
    with SuffixExecution(model, 2, max_bytes=32 * 4 * 20) as sx:  # about one row of 20 tokens
        got = measure_logprobs(model, pieces, batch_size=4)
        got2 = measure_logprobs(model, pieces, batch_size=4)
    assert sx.stats.evicted > 0 and torch.allclose(got, full, atol=TOL, rtol=0) and torch.allclose(got2, full, atol=TOL, rtol=0)


def test_lowest_block_and_the_whole_model_fallback():
    model = tiny("llama")
    assert lowest_block(select_targets(model, "1-3")) == 1
    assert lowest_block(select_targets(model, "re:model\\.layers\\.2\\.mlp\\.down_proj")) == 2
    assert lowest_block(select_targets(model, "re:lm_head")) is None
    with suffix_execution(model, None) as sx:
        measure_logprobs(model, random_pieces(3))
    assert sx.stats.suffix_calls == 0 and "forward" not in vars(model.base_model)


@pytest.mark.slow
def test_suffix_is_exact_on_the_real_default_model(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    facts = [("The capital of France is", " Paris"), ("The Eiffel Tower is located in the city of", " Paris"),
             ("Water is made of hydrogen and", " oxygen"), ("Who painted the Mona Lisa? The answer is", " Leonardo da Vinci"),
             ("The largest planet in the Solar System is", " Jupiter"), ("William Shakespeare was born in", " Stratford")]
    enc = [encode(tok, p, a) for p, a in facts]
    full = measure_logprobs(model, enc, batch_size=6, pad_id=smollm2.pad_id)
    for block in (4, 26):
        with SuffixExecution(model, block) as sx:
            measure_logprobs(model, enc[:3], batch_size=3, pad_id=smollm2.pad_id)
            got = measure_logprobs(model, enc, batch_size=6, pad_id=smollm2.pad_id)
        assert float((got - full).abs().max()) <= TOL and sx.stats.rows_reused == 3
    assert collate(enc).input_ids.shape[0] == 6


def test_the_value_optimisation_from_the_lookup_token_is_exact_on_the_real_default_model(smollm2):
    tok = smollm2.tokenizer
    rw = Rewrite(encode(tok, "The name of the country of citizenship of Leonardo DiCaprio is", " Syria"),
                 subject="Leonardo DiCaprio")
    prompts = templated_prompts(tok, rw, ["", "The city is large. ", "Therefore, we went home early. "], "subject_last", 256)
    assert prompts.found and min(prompts.lookup) > 0
    got = {}
    for cached in (False, True):
        ctx = EditContext(model=smollm2.model, targets=[], pad_id=smollm2.pad_id, reader=None, covariance=None,
                          prefix_cache=cached)
        got[cached] = optimise_value(ctx, find_blocks(smollm2.model)[1][4].mlp, 576, prompts, 3, 0.5, 0.0625, 1e-3, 4.0)
    (init, delta, trace), (init_c, delta_c, trace_c) = got[False], got[True]
    assert trace["steps"] == trace_c["steps"] == 2 and abs(trace["loss"] - trace_c["loss"]) <= 1e-4 * trace["loss"]
    assert float((init - init_c).norm()) <= TOL * float(init.norm())
    assert float((delta - delta_c).norm()) <= 1e-4 * float(delta.norm())


def test_a_benchmark_ripple_gives_the_same_results_from_the_suffix(tmp_path):
    cfg = coupled_edit_run(tmp_path, n_edits=2, tests_per_edit=3, layers="2-3")
    shutil.copytree(tmp_path / "run", tmp_path / "whole")
    suffix = ripple(cfg, tmp_path / "run", show_progress=False).summary
    cfg.ripple.full_model = True
    whole = ripple(cfg, tmp_path / "whole", show_progress=False).summary
    assert suffix.suffix.from_block == 2 and suffix.suffix.rows_reused > 0 and whole.suffix.from_block is None
    assert suffix.n_edits == whole.n_edits == 2
    for a, b in zip(suffix.edits, whole.edits):
        assert abs(a.logprob_new_after - b.logprob_new_after) <= 1e-4 and a.success == b.success
        assert abs(a.mean_rise_own_tests - b.mean_rise_own_tests) <= 1e-4


def test_hooks_see_what_the_full_model_gives_them():
    """A pre-hook already on block L gets the stored residual, not the embeddings; a hook on the embeddings
    (outside the blocks) makes the call run whole."""
    model = tiny("llama")
    pieces = random_pieces(5, seed=6)
    blocks = find_blocks(model)[1]
    seen = []
    h = blocks[2].register_forward_pre_hook(lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()),
                                            with_kwargs=True)
    full = measure_logprobs(model, pieces, batch_size=5)
    ref = seen.pop()
    with SuffixExecution(model, 2) as sx:
        measure_logprobs(model, pieces, batch_size=5)
        measure_logprobs(model, pieces, batch_size=5)
        real = collate(sorted(pieces, key=lambda e: e.n_inputs)).attention_mask.bool()  # padding holds zeros here
        assert sx.stats.rows_reused == 5 and torch.allclose(seen[-1][real], ref[real], atol=1e-6)
        h.remove()
        calls = []
        e = model.base_model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
        got = measure_logprobs(model, pieces, batch_size=5)
        e.remove()
    assert calls and sx.stats.full_calls == 1 and torch.allclose(got, full, atol=TOL, rtol=0)


def test_a_covariance_is_cached_per_weights_not_only_per_fingerprint(tmp_path, monkeypatch):
    from gradcouple import keys

    monkeypatch.setenv("GRADCOUPLE_CACHE", str(tmp_path))
    from gradcouple.models import load_model

    loaded = load_model("llama-tiny-random", device="cpu")
    target = select_targets(loaded.model, "2")
    (a, sa), = keys.cached_wikipedia_covariances("same-name", loaded.model, loaded.tokenizer, target, 512).values()
    (b, sb), = keys.cached_wikipedia_covariances("same-name", loaded.model, loaded.tokenizer, target, 512).values()
    assert sa.file == sb.file and torch.equal(a, b)  # read back
    with torch.no_grad():
        find_blocks(loaded.model)[1][0].mlp.down_proj.weight.mul_(2.0)  # the same fingerprint, other weights
    (c, sc), = keys.cached_wikipedia_covariances("same-name", loaded.model, loaded.tokenizer, target, 512).values()
    assert sc.file != sa.file and not torch.equal(c, a) and len(list((tmp_path / "covariance").glob("*.pt"))) == 2
