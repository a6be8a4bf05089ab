"""Disk per piece of the factors store against dense fp16 gradients, from the manifest's arithmetic."""

from __future__ import annotations

import json
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gradcouple.gradients import batch_factors
from gradcouple.layers import select_targets
from gradcouple.scoring import EncodedPiece, collate

from storeutil import write_store


def test_factors_vs_dense_at_llama2_7b_widths(tmp_path):
    """A random 2-block model with Llama-2-7B's widths (d_model 4096, d_ff 11008), pieces of 32 tokens."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                                             num_attention_heads=32, num_key_value_heads=32))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        model.model.rotary_emb.__init__(model.config)
    model.eval().requires_grad_(False)
    targets = select_targets(model, "all")
    assert [(t.d_in, t.d_out) for t in targets] == [(11008, 4096)] * 2
    rng = random.Random(0)
    pieces = [EncodedPiece(tuple(rng.randrange(256) for _ in range(33)), 30, "p", "a") for _ in range(2)]
    write_store(tmp_path, targets, batch_factors(model, targets, collate(pieces)), shard_size=2)
    man = json.loads((tmp_path / "manifest.json").read_text())
    factors_per_piece = sum(s["bytes"] for s in man["shards"]) / 2
    dense_per_piece = sum(t["d_out"] * (t["d_in"] + int(t["bias"])) * 2 for t in man["targets"])
    assert dense_per_piece == 2 * 4096 * 11008 * 2
    assert factors_per_piece <= dense_per_piece / 50, (factors_per_piece, dense_per_piece)
