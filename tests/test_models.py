"""Model loading paths and target-layer selection on real architectures' shapes."""

from __future__ import annotations

import json
import time

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gradcouple.config import RunConfig
from gradcouple.errors import ConfigError, ModelError
from gradcouple.extract import extract
from gradcouple.layers import parse_block_spec, select_targets
from gradcouple.models import LoadedModel, load_model

from conftest import write_fact_pieces


def test_gpt2_small_all_c_proj_dimension(tmp_path, tiny_llama_loaded):
    """GPT-2 small, --layers all: 12 x (3072 x 768 + 768) = 28,320,768 parameters, as the seed reports."""
    model = GPT2LMHeadModel(GPT2Config()).eval().requires_grad_(False)
    targets = select_targets(model, "all")
    assert [t.name for t in targets] == [f"transformer.h.{i}.mlp.c_proj" for i in range(12)]
    assert all(t.transposed and t.has_bias and (t.d_in, t.d_out) == (3072, 768) for t in targets)
    write_fact_pieces(tmp_path / "p.jsonl", n=2)
    cfg = RunConfig()
    cfg.data.pieces = tmp_path / "p.jsonl"
    cfg.model.layers = "all"
    loaded = LoadedModel(model, tiny_llama_loaded.tokenizer, "gpt2-small-random", "GPT2Config()", architecture="gpt2")
    extract(cfg, tmp_path / "run", loaded=loaded, show_progress=False)
    man = json.loads((tmp_path / "run/gradients/manifest.json").read_text())
    assert man["n_params"] == 28_320_768


def test_llama_default_targets_and_specs():
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
                                     num_attention_heads=2, num_key_value_heads=1))
    assert [t.name for t in select_targets(m)] == [f"model.layers.{i}.mlp.down_proj" for i in (2, 3, 4, 5)]
    assert [t.name for t in select_targets(m, "1-2")] == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert len(select_targets(m, r"re:model\.layers\.\d+\.self_attn\.o_proj")) == 6
    assert select_targets(m, "0", module="mlp.up_proj")[0].d_out == 24
    assert parse_block_spec("0,-1", 6) == [0, 5]
    with pytest.raises(ConfigError, match="--layers"):
        select_targets(m, "7")
    with pytest.raises(ConfigError, match="--layers"):
        select_targets(m, "re:nothing")
    with pytest.raises(ConfigError, match="last1..last6"):
        select_targets(m, "last50")
    with pytest.raises(ConfigError, match="--module 'mlp.up_projj'.*mlp.up_proj"):
        select_targets(m, "last2", module="mlp.up_projj")


def test_local_directory_model(tmp_path, tiny_llama_loaded):
    tiny_llama_loaded.model.save_pretrained(tmp_path / "m")
    tiny_llama_loaded.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    assert loaded.architecture == "llama" and loaded.source == str(tmp_path / "m")
    assert all(not p.requires_grad for p in loaded.model.parameters())


def test_unreachable_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        load_model("no-such-org/no-such-model-xyz", device="cpu")
    assert time.perf_counter() - t < 30


def test_missing_gguf_file():
    with pytest.raises(ModelError, match="no such GGUF"):
        load_model("/nonexistent/model.gguf")
