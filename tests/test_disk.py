"""Disk per piece of the factors store at Llama-2-7B widths, against dense fp16 gradients.

The targets come from a Llama model with Llama-2-7B's widths (d_model 4096, d_ff 11008) built on
the meta device (shapes only, no weights); the factors of 32-position pieces are random, since
the bytes on disk depend on shapes alone.
"""

from __future__ import annotations

import pytest
import torch
from storeutil import write_store
from transformers import LlamaConfig, LlamaForCausalLM

from gradcouple.gradients import PieceFactors
from gradcouple.layers import select_targets
from gradcouple.rundir import RunDir

D_MODEL, D_FF = 4096, 11008
N_BLOCKS = 2
N_PIECES = 2
POSITIONS = 32            # inputs per piece (33 tokens)
FP16_BYTES = 2
MIN_SAVING = 50           # dense fp16 gradients take at least this many times the factors' disk
FORMAT_OVERHEAD = 1.05    # shard bytes over the fp16 factors themselves (offsets, scales, container)


@pytest.fixture(scope="module")
def targets():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=D_MODEL, intermediate_size=D_FF,
                                             num_hidden_layers=N_BLOCKS, num_attention_heads=32, num_key_value_heads=32))
    return select_targets(model, "all")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, targets):
    g = torch.Generator().manual_seed(0)
    factors = [PieceFactors({t.name: torch.randn(POSITIONS, t.d_in_aug, generator=g) for t in targets},
                            {t.name: torch.randn(POSITIONS, t.d_out, generator=g) for t in targets}, 0.0,
                            {t.name: 0.0 for t in targets}) for _ in range(N_PIECES)]
    root = tmp_path_factory.mktemp("disk")
    write_store(root, targets, factors, shard_size=N_PIECES)
    return RunDir(root).gradients.load_manifest()


def test_llama2_7b_widths_give_down_projection_targets(targets):
    assert [(t.d_in, t.d_out, t.has_bias) for t in targets] == [(D_FF, D_MODEL, False)] * N_BLOCKS


def test_factors_take_T_times_d_in_plus_d_out_fp16_numbers(manifest):
    """Per piece and target the store keeps X (T, d_in') and Delta (T, d_out) in fp16, little else."""
    factors_per_piece = sum(s.bytes for s in manifest.shards) / N_PIECES
    numbers = sum(POSITIONS * (t.d_in_aug + t.d_out) for t in manifest.targets)
    assert factors_per_piece <= FORMAT_OVERHEAD * numbers * FP16_BYTES, (factors_per_piece, numbers * FP16_BYTES)


def test_factors_take_at_most_a_fiftieth_of_dense_fp16_gradients(manifest):
    factors_per_piece = sum(s.bytes for s in manifest.shards) / N_PIECES
    dense_per_piece = sum(t.d_out * t.d_in_aug for t in manifest.targets) * FP16_BYTES
    assert factors_per_piece <= dense_per_piece / MIN_SAVING, (factors_per_piece, dense_per_piece)
