"""Model loading paths, the byte-level tokenizer, and target-layer selection on real architectures' shapes.

Real-size architectures are built on the meta device (shapes only, no weights); nothing here
needs the real SmolLM2 or Gemma GGUF files.
"""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gradcouple.errors import ConfigError, ModelError
from gradcouple.layers import parse_block_spec, select_targets
from gradcouple.models import GGUF_ALIASES, RANDOM_ALIASES, byte_level_tokenizer, load_model, pad_id

GPT2_SMALL_C_PROJ_PARAMS = 28_320_768  # 12 x (3072 x 768 + 768), the figure the seed reports
HUB_FAIL_FAST_S = 30  # seconds an unreachable Hub id may take to fail
BYTE_VOCAB = 256 + 1  # byte tokens and <|endoftext|>


# ---------------------------------------------------------------- GPT-2 small


@pytest.fixture(scope="module")
def gpt2_small_targets():
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    return select_targets(model, "all")


def test_gpt2_small_all_layers_are_the_twelve_c_proj(gpt2_small_targets):
    assert [t.name for t in gpt2_small_targets] == [f"transformer.h.{i}.mlp.c_proj" for i in range(12)]


def test_gpt2_small_c_proj_targets_are_transposed_conv1d_with_bias(gpt2_small_targets):
    assert all((t.transposed, t.has_bias, t.d_in, t.d_out) == (True, True, 3072, 768) for t in gpt2_small_targets)


def test_gpt2_small_c_proj_targets_count_every_module_parameter(gpt2_small_targets):
    assert [t.n_params for t in gpt2_small_targets] == [sum(p.numel() for p in t.module.parameters())
                                                        for t in gpt2_small_targets]


def test_gpt2_small_all_c_proj_hold_28_320_768_parameters(gpt2_small_targets):
    """GPT-2 small, --layers all: 12 x (3072 x 768 + 768) = 28,320,768 parameters, as the seed reports
    (the manifest's n_params is this sum; tests/test_extract.py checks that on an extraction)."""
    assert sum(t.n_params for t in gpt2_small_targets) == GPT2_SMALL_C_PROJ_PARAMS


# ---------------------------------------------------------------- layer specs (a 6-block LLaMA)


@pytest.fixture(scope="module")
def llama6():
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
                                        num_attention_heads=2, num_key_value_heads=1))


def test_default_targets_are_the_last_four_down_projections(llama6):
    assert [t.name for t in select_targets(llama6)] == [f"model.layers.{i}.mlp.down_proj" for i in (2, 3, 4, 5)]


def test_block_range_selects_those_blocks(llama6):
    assert [t.name for t in select_targets(llama6, "1-2")] == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]


def test_regex_selects_matching_linear_modules(llama6):
    assert len(select_targets(llama6, r"re:model\.layers\.\d+\.self_attn\.o_proj")) == 6


def test_module_option_selects_another_linear_layer(llama6):
    assert select_targets(llama6, "0", module="mlp.up_proj")[0].d_out == 24


def test_negative_block_indices_count_from_the_end():
    assert parse_block_spec("0,-1", 6) == [0, 5]


@pytest.mark.parametrize("layers,module,message", [
    ("7", None, "--layers"),
    ("re:nothing", None, "--layers"),
    ("last50", None, "last1..last6"),
    ("last2", "mlp.up_projj", "--module mlp.up_projj: .*has no such module.*mlp.up_proj"),
])
def test_bad_layer_spec_is_a_config_error_naming_the_flag(llama6, layers, module, message):
    with pytest.raises(ConfigError, match=message):
        select_targets(llama6, layers, module=module)


# ---------------------------------------------------------------- tokenizer and random aliases


def test_byte_level_tokenizer_round_trips_any_text():
    tok = byte_level_tokenizer()
    text = "Ünïcödé, emoji 🙂 and\ttabs: naïve café"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_byte_level_tokenizer_has_a_byte_vocabulary():
    assert len(byte_level_tokenizer()) == BYTE_VOCAB


def test_byte_level_tokenizer_pads_with_end_of_text():
    tok = byte_level_tokenizer()
    assert pad_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>")


def test_tokenizer_without_pad_token_pads_with_zero():
    assert pad_id(SimpleNamespace(pad_token_id=None)) == 0


@pytest.mark.parametrize("alias", RANDOM_ALIASES)
def test_random_aliases_load_without_any_gguf_package(monkeypatch, alias):
    """The random aliases build their tokenizer in memory: no SmolLM2 (or Gemma) package is read."""
    gguf_packages = {dist for dist, _, _ in GGUF_ALIASES.values()}
    real = importlib.metadata.distribution

    def no_gguf(name):
        if name in gguf_packages:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_gguf)
    loaded = load_model(alias, device="cpu")
    assert len(loaded.tokenizer) == BYTE_VOCAB


# ---------------------------------------------------------------- local directories, Hub ids, GGUF files


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, tiny_llama_loaded):
    path = tmp_path_factory.mktemp("m")
    tiny_llama_loaded.model.save_pretrained(path)
    tiny_llama_loaded.tokenizer.save_pretrained(path)
    return path


def test_local_directory_loads_its_architecture_and_source(saved_dir):
    loaded = load_model(str(saved_dir), device="cpu")
    assert (loaded.architecture, loaded.source) == ("llama", str(saved_dir))


def test_local_directory_loads_the_saved_weights(saved_dir, tiny_llama_loaded):
    loaded = load_model(str(saved_dir), device="cpu")
    saved = tiny_llama_loaded.model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.model.state_dict().items())


def test_local_directory_loads_the_saved_tokenizer(saved_dir, tiny_llama_loaded):
    text = "Who wrote Hamlet? William Shakespeare"
    assert load_model(str(saved_dir), device="cpu").tokenizer(text)["input_ids"] == tiny_llama_loaded.tokenizer(text)["input_ids"]


def test_loaded_models_are_frozen(saved_dir):
    assert all(not p.requires_grad for p in load_model(str(saved_dir), device="cpu").model.parameters())


def test_unreachable_hub_id_fails_fast_naming_the_offline_setting(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        load_model("no-such-org/no-such-model-xyz", device="cpu")
    assert time.perf_counter() - t < HUB_FAIL_FAST_S


def test_missing_gguf_file_is_a_model_error():
    with pytest.raises(ModelError, match="no such GGUF"):
        load_model("/nonexistent/model.gguf")


def test_unknown_device_is_a_model_error_naming_the_flag():
    from gradcouple.errors import ModelError
    from gradcouple.models import resolve_device

    with pytest.raises(ModelError, match="--device tpu"):
        resolve_device("tpu")


def test_manifest_records_the_dtype_actually_used_on_cpu(tmp_path):
    from gradcouple.config import RunConfig
    from gradcouple.stages.extract import extract
    from gradcouple.rundir import RunDir

    from conftest import write_fact_pieces

    write_fact_pieces(tmp_path / "p.jsonl", n=3)
    cfg = RunConfig()
    cfg.data.pieces, cfg.model.name, cfg.model.device, cfg.model.dtype = tmp_path / "p.jsonl", "llama-tiny-random", "cpu", "bfloat16"
    extract(cfg, tmp_path / "run", show_progress=False)
    assert RunDir(tmp_path / "run").gradients.load_manifest().compute_dtype == "bfloat16"  # torch computes in bf16 on CPU too


def test_the_dequantised_model_cache_is_verified_file_by_file(tmp_path):
    from gradcouple.models import CACHE_SUMS, _cache_problem, _write_cache

    loaded = load_model("llama-tiny-random")
    cached = tmp_path / "gguf" / "abc"
    _write_cache(cached, loaded.model, loaded.tokenizer)
    assert _cache_problem(cached) is None and not [p for p in cached.parent.iterdir() if p.name.startswith(".")]
    weights = next(cached.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert _cache_problem(cached) == f"{weights.name} differs from the sha256 recorded when it was written"
    weights.unlink()
    assert _cache_problem(cached) == f"{weights.name} is missing"
    (cached / CACHE_SUMS).unlink()
    assert _cache_problem(cached) == f"no valid {CACHE_SUMS}"


def test_a_cache_that_cannot_be_written_leaves_no_temporary_directory(tmp_path, monkeypatch):
    from gradcouple.models import _write_cache

    loaded = load_model("llama-tiny-random")
    written = []

    def half_written(self, d):
        written.append(Path(d, "model.safetensors"))
        written[0].write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(loaded.model), "save_pretrained", half_written)
    _write_cache(tmp_path / "gguf" / "abc", loaded.model, loaded.tokenizer)
    assert written and list((tmp_path / "gguf").iterdir()) == []
