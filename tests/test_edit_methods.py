"""ROME, MEMIT, AlphaEdit and FT-L on tiny models, each against a property its paper states,
checked by an independent computation (plain forward hooks, explicit inverses): ROME writes
W k* = v* and leaves keys orthogonal to its key alone; MEMIT with one block and one rewrite is
R kᵀ(λC + kkᵀ)⁻¹; AlphaEdit's update vanishes on keys outside its null space; FT-L stays within
norm_constraint; every method restores the weights bit for bit."""

from __future__ import annotations

import pytest
import torch

from gradcouple.edits import EditContext, Rewrite, edited, method_class
from gradcouple.edits.alphaedit import null_space_projector
from gradcouple.edits.published import HPARAMS_DIR, published_hparams, read_hparams_file
from gradcouple.edits.templates import context_templates
from gradcouple.errors import ArtifactError, ConfigError
from gradcouple.layers import select_targets
from gradcouple.models import load_model
from gradcouple.scoring import encode, measure_logprobs

REL = 1e-5
FEW_TEMPLATES = [[5, 5]]  # the properties hold for any templates; fewer keep the tests fast

PROMPT, SUBJECT, NEW = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " English"


@pytest.fixture(scope="module", params=["gpt2-tiny-random", "llama-tiny-random"])
def lm(request):
    """A tiny random model with its tokenizer (GPT-2: Conv1D with bias; LLaMA: Linear without)."""
    return load_model(request.param, device="cpu")


def spd(d: int, seed: int, small: int = 0) -> torch.Tensor:
    """A symmetric positive definite (d, d) float64 matrix; its ``small`` lowest eigenvalues are 1e-4."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ev = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    ev[:small] = 1e-4
    return Q @ torch.diag(ev) @ Q.t()


def context(lm, covariances: dict) -> EditContext:
    targets = select_targets(lm.model, "all")

    def cov(t):
        return covariances.setdefault(t.name, spd(t.d_in_aug, seed=t.block, small=t.d_in // 2))

    return EditContext(lm.model, targets, lm.pad_id, None, cov, tokenizer=lm.tokenizer, fingerprint=f"test:{lm.name}",
                       max_length=256)


def rewrite(lm) -> Rewrite:
    return Rewrite(encode(lm.tokenizer, PROMPT, NEW, 256), subject=SUBJECT)


def hooked(model, module, text_ids: list[int], pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s input and output at ``pos`` of one unpadded sequence: plain hooks, one forward."""
    got = {}
    h = module.register_forward_hook(lambda m, a, o: got.update(x=a[0][0, pos].double(), y=(o[0] if isinstance(o, tuple) else o)[0, pos].double()))
    try:
        with torch.no_grad():
            model(torch.tensor([text_ids]))
    finally:
        h.remove()
    return got["x"], got["y"]


def subject_last(tok, text: str) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the token holding the subject's last character."""
    enc = tok(text, return_offsets_mapping=True)
    end = text.rfind(SUBJECT) + len(SUBJECT)
    return list(enc["input_ids"]), next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end <= b)


@pytest.mark.parametrize("mom2_adjustment", [False, True])
def test_rome_writes_v_star_at_k_star_and_leaves_orthogonal_keys_alone(lm, mom2_adjustment):
    covs: dict = {}
    ctx = context(lm, covs)
    rome = method_class("rome").resolve({"layers": [1], "v_num_grad_steps": 3, "mom2_adjustment": mom2_adjustment,
                                         "context_template_length_params": FEW_TEMPLATES}, model=lm.model)
    t = next(t for t in ctx.targets if t.block == 1)
    rome.prepare(ctx)
    prefixes = [p for g in context_templates(lm.model, lm.tokenizer, ctx.fingerprint,
                                             rome.hp.context_template_length_params) for p in g]
    # the key, independently: the input at the subject's last token behind every template, averaged
    keys = torch.stack([hooked(lm.model, t.module, *subject_last(lm.tokenizer, p + PROMPT))[0] for p in prefixes])
    u = keys.mean(0)
    if mom2_adjustment:
        u = torch.linalg.inv(covs[t.name][:t.d_in, :t.d_in]) @ u
    u = u / u.norm()
    ids, pos = subject_last(lm.tokenizer, PROMPT)
    k_star, _ = hooked(lm.model, t.module, ids, pos)
    w0 = t.weight_matrix().double()
    with edited(rome, ctx, [rewrite(lm)]) as delta:
        tr = rome.trace[t.name]
        assert torch.allclose(tr["u"], u, rtol=1e-4, atol=1e-6 * float(u.abs().max()))
        assert torch.allclose(tr["k_star"], k_star, rtol=1e-5, atol=1e-7)
        _, out = hooked(lm.model, t.module, ids, pos)
        assert float((out - tr["v_star"]).norm()) <= REL * float(tr["v_star"].norm())  # W k* = v*
        dw = t.weight_matrix().double() - w0
        assert torch.allclose(delta[t.name].double(), dw, atol=1e-6)
        other = torch.randn(t.d_in, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        other -= (other @ u) * u  # uᵀk = 0: orthogonal to the key under C⁻¹
        rounding = 1e-6 * float(w0.norm()) * float(other.norm())  # W + ΔW is stored in float32
        assert float((dw[:, :t.d_in] @ other).norm()) <= rounding < 1e-2 * float((dw[:, :t.d_in] @ u).norm()) * float(other.norm())
        assert all(float(d.abs().max()) == 0 for n, d in delta.items() if n != t.name)
        if t.has_bias:
            assert float(dw[:, -1].abs().max()) == 0  # ROME edits the weight, not the bias
    assert torch.equal(t.weight_matrix().double(), w0)


def test_memit_with_one_block_and_one_rewrite_is_the_closed_form(lm):
    covs: dict = {}
    ctx = context(lm, covs)
    memit = method_class("memit").resolve({"layers": [1], "v_num_grad_steps": 3, "mom2_update_weight": 3.0,
                                           "context_template_length_params": FEW_TEMPLATES}, model=lm.model)
    t = next(t for t in ctx.targets if t.block == 1)
    memit.prepare(ctx)
    groups = context_templates(lm.model, lm.tokenizer, ctx.fingerprint, memit.hp.context_template_length_params)
    # keys, independently: averaged within each template group, then across groups
    k = torch.stack([torch.stack([hooked(lm.model, t.module, *subject_last(lm.tokenizer, p + PROMPT))[0] for p in g]).mean(0)
                     for g in groups]).mean(0)
    ids, pos = subject_last(lm.tokenizer, PROMPT)
    from gradcouple.edits.value import block_module

    _, h_before = hooked(lm.model, block_module(lm.model, 1), ids, pos)
    with edited(memit, ctx, [rewrite(lm)]) as delta:
        tr = memit.trace[t.name]
        assert torch.allclose(tr["K"][:, 0], k, rtol=1e-4, atol=1e-6)
        R = tr["Z"][:, 0] - h_before  # one block: the whole residual
        C = covs[t.name][:t.d_in, :t.d_in]
        expected = torch.outer(R, k) @ torch.linalg.inv(3.0 * C + torch.outer(k, k))
        got = delta[t.name].double()[:, :t.d_in]
        assert float((got - expected).norm()) <= 1e-5 * float(expected.norm())


def test_alphaedit_update_vanishes_on_keys_outside_its_null_space(lm):
    covs: dict = {}
    ctx = context(lm, covs)
    alpha = method_class("alphaedit").resolve({"layers": "1-2", "v_num_grad_steps": 3, "nullspace_threshold": 1e-2,
                                               "context_template_length_params": FEW_TEMPLATES}, model=lm.model)
    alpha.prepare(ctx)
    rw = rewrite(lm)
    with edited(alpha, ctx, [rw]) as delta:
        for t in (t for t in ctx.targets if t.block in (1, 2)):
            C = covs[t.name][:t.d_in, :t.d_in]
            S, U = torch.linalg.eigh(C)
            P = U[:, S < 1e-2] @ U[:, S < 1e-2].t()
            assert torch.allclose(null_space_projector(C, 1e-2), P, atol=1e-10)
            assert 0 < round(float(P.trace())) < t.d_in
            k0 = (torch.eye(t.d_in, dtype=torch.float64) - P) @ torch.randn(t.d_in, dtype=torch.float64)  # P k0 = 0
            dw = alpha.trace[t.name]["dW"]
            assert float(dw.norm()) > 0
            assert float((dw @ k0).norm()) <= 1e-7 * float(dw.norm()) * float(k0.norm())
            w = t.weight_matrix().double()[:, :t.d_in]  # applied in float32: equal up to its rounding
            assert float((delta[t.name].double()[:, :t.d_in] - dw).abs().max()) <= 1e-6 * float(w.abs().max())
        # a second rewrite in the same sequence sees the first one's keys in cache_c
        first = {n: v.clone() for n, v in alpha.cache_c.items()}
        assert first and all(float(v.norm()) > 0 for v in first.values())
    assert alpha.cache_c == {}  # emptied with the restore


def test_ft_l_never_moves_a_weight_further_than_norm_constraint(lm):
    ctx = context(lm, {})
    ftl = method_class("ft-l").resolve({"layers": "0-1", "lr": 1e-2, "num_steps": 4, "norm_constraint": 1e-3},
                                       model=lm.model)
    before = measure_logprobs(lm.model, [rewrite(lm).new])
    with edited(ftl, ctx, [rewrite(lm)]) as delta:
        moved = {n: float(d.abs().max()) for n, d in delta.items()}
        after = measure_logprobs(lm.model, [rewrite(lm).new])
    assert max(moved.values()) <= 1e-3 + 1e-7  # the bound, up to float32 rounding of the weights themselves
    assert all(moved[t.name] > 0 for t in ctx.targets if t.block in (0, 1))
    assert all(moved[t.name] == 0 for t in ctx.targets if t.block not in (0, 1))
    assert float(after[0]) > float(before[0])


@pytest.mark.parametrize("name", ["ft", "ft-l", "rome", "memit", "alphaedit"])
def test_every_method_restores_every_weight_bit_for_bit(lm, name):
    ctx = context(lm, {})
    over = {} if name == "ft" else {"layers": "1-2"}
    over.update({"ft": {"steps": 2}, "ft-l": {"num_steps": 2}}.get(
        name, {"v_num_grad_steps": 2, "context_template_length_params": FEW_TEMPLATES}))
    method = method_class(name).resolve(over, model=lm.model)
    method.prepare(ctx)
    saved = {n: p.detach().clone() for n, p in lm.model.state_dict().items()}
    with edited(method, ctx, [rewrite(lm)]) as delta:
        assert any(float(d.abs().max()) > 0 for d in delta.values())
    assert all(torch.equal(p, saved[n]) for n, p in lm.model.state_dict().items())


def test_a_method_refuses_blocks_the_extraction_lacks_naming_the_layers_that_extract_them(lm):
    targets = select_targets(lm.model, "2-3")
    rome = method_class("rome").resolve({"layers": [1]}, model=lm.model)
    with pytest.raises(ArtifactError, match=r"^--method rome edits block 1, whose gradients the extraction lacks \(it "
                                            r"has blocks 2-3\); extract with --layers 1-3 .*--edit-layers within 2-3\.$"):
        rome.check(targets)


def test_layers_without_published_settings_follow_the_depth_and_say_so(lm):
    for name, expected in [("rome", [1]), ("memit", [0, 1]), ("ft-l", [1])]:
        m = method_class(name).resolve(model=lm.model)
        assert m.hp.layers == expected and "layers by depth" in m.source


def test_context_templates_are_sampled_once_seeded_and_kept(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADCOUPLE_CACHE", str(tmp_path))
    a = context_templates(lm.model, lm.tokenizer, "fp", [[5, 10]], seed=0)
    assert a[0] == [""] and len(a[1]) == 10 and all(p.endswith(". ") and "{" not in p for p in a[1])
    assert all(p.startswith(w) for p, w in zip(a[1][::2], ("The", "Therefore", "Because", "I", "You")))
    saved = list((tmp_path / "context-templates").glob("*.json"))
    assert len(saved) == 1
    assert context_templates(None, None, "fp", [[5, 10]], seed=0) == a  # read back: no model needed
    b = context_templates(lm.model, lm.tokenizer, "fp", [[5, 10]], seed=1)
    assert b != a


EASYEDIT_ROME = """alg_name: "ROME"
model_name: "./hugging_cache/llama-2-7b-chat"
device: 0
layers: [5]
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
"""


def test_a_reference_settings_file_is_read_as_it_is(tmp_path):
    path = tmp_path / "llama-7b.yaml"
    path.write_text(EASYEDIT_ROME)
    knobs = read_hparams_file(path, method_class("rome"))
    assert knobs["layers"] == [5] and "rewrite_module_tmp" not in knobs and "mom2_n_samples" not in knobs
    hp = method_class("rome").resolve(file=str(path)).hp
    assert (hp.v_lr, hp.v_loss_layer, hp.context_template_length_params) == (0.5, 31, [[5, 10], [10, 10]])  # "5e-1" too
    with pytest.raises(ConfigError, match=r"alg_name 'ROME' is for --method rome, and these edits are memit"):
        read_hparams_file(path, method_class("memit"))
    path.write_text(EASYEDIT_ROME + "v_lr_typo: 1\n")
    with pytest.raises(ConfigError, match=r"'v_lr_typo' is not a knob of --method rome"):
        read_hparams_file(path, method_class("rome"))
    path.write_text('{"layers": [0], "num_steps": 25, "lr": 5e-4, "weight_decay": 0, "kl_factor": 0, '
                    '"norm_constraint": false, "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj"}')
    json_path = path.rename(tmp_path / "gpt2-xl_constr.json")
    assert method_class("ft-l").resolve(file=str(json_path)).hp.norm_constraint is None


def test_every_published_settings_file_is_valid_for_its_method():
    files = sorted(HPARAMS_DIR.glob("*/*.yaml"))
    assert {f.parent.name for f in files} >= {"rome", "memit", "alphaedit", "ft-l"}
    for f in files:
        knobs = read_hparams_file(f, method_class(f.parent.name))
        method_class(f.parent.name).Hparams.model_validate(knobs)


def test_published_settings_match_the_model_they_name(tiny_llama_loaded):
    assert published_hparams("rome", tiny_llama_loaded.model) == ({}, None)


def test_memit_names_the_blocks_whose_mlp_output_is_normalised_before_the_residual():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from gradcouple.edits.memit import normalised_mlp_output
    from conftest import tiny_llama

    gemma = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    assert normalised_mlp_output(gemma, [0, 2]) == [0, 2]
    assert normalised_mlp_output(tiny_llama(), [0, 1, 2]) == []
