"""The measured figures of docs/scale.md: activation bytes per token and host work per piece at
Llama-2 7B / 13B / 70B shapes, on any machine (no GPU, no download, about a minute).

    python benchmarks/scale_costs.py

* Activations: the bytes autograd saves for the backward of one gradcouple batch (bf16, default
  targets: the last 4 ``mlp.down_proj``), counted with ``torch.autograd.graph.saved_tensors_hooks``
  over the real Llama layers built on the ``meta`` device (shapes only, nothing allocated), at
  T = 32, 64, 128, 256 input positions and fitted as ``c + a*T + b*T^2`` per token. Saved references
  to the frozen weights (linear layers keep W for their input gradient) are left out: they cost no
  memory. transformers' mask helpers are told they are being traced, so they do not read values.
* Host work per piece (Llama-2-7B, T = 32, random factors of the real shapes): the float64 norms,
  the ``factors`` and ``projected`` encodings (:class:`gradcouple.stores.ShardWriter`), and the write
  of a 16-piece ``factors`` shard (torch.save, fsync, sha256) to a temporary directory.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

LLAMA2 = {  # meta-llama/Llama-2-{7b,13b,70b}-hf config.json
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
}


def saved_bytes(model, T: int) -> int:
    from gradcouple.capture import FactorCapture
    from gradcouple.layers import select_targets
    from gradcouple.scoring import EncodedPiece, answer_logprob, collate

    targets = select_targets(model, "last4")
    batch = collate([EncodedPiece(tuple(range(5, 5 + T)), T - 2, "p", "a")], 0).to("meta")
    batch = dataclasses.replace(batch, attention_mask=None)  # one unpadded piece
    params = {id(p) for p in model.parameters()}
    total = [0]

    def pack(t):
        if id(t) not in params and id(getattr(t, "_base", None)) not in params:
            total[0] += t.numel() * t.element_size()
        return t

    with FactorCapture(targets), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        answer_logprob(model, batch)
    return total[0]


def activations() -> None:
    import numpy as np
    import transformers.masking_utils as masking
    from transformers import LlamaConfig, LlamaForCausalLM

    masking.is_tracing = lambda *a, **k: True  # the mask helpers would read meta values otherwise
    print("activations saved for the backward (bf16, last4 down_proj), bytes:")
    for name, kw in LLAMA2.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, tie_word_embeddings=False, **kw)).to(torch.bfloat16)
        model.eval().requires_grad_(False)
        n = sum(p.numel() for p in model.parameters())
        Ts = [32, 64, 128, 256]
        b, a, _ = np.polyfit(Ts, [saved_bytes(model, T) for T in Ts], 2)
        print(f"  Llama-2-{name}: {n:,} parameters; per token {a:,.0f} + {b:,.0f}*T")


def host_work(T: int = 32, d_in: int = 11008, d_out: int = 4096, n_targets: int = 4) -> None:
    from gradcouple.artifacts import StoreSettings, TargetShape
    from gradcouple.gradients import PieceFactors, factored_sq_norm
    from gradcouple.stores import ShardWriter

    g = torch.Generator().manual_seed(0)
    names = [f"t{k}" for k in range(n_targets)]
    xs = {n: torch.randn(T, d_in, generator=g) for n in names}
    ds = {n: torch.randn(T, d_out, generator=g) * 1e-3 for n in names}
    pf = PieceFactors(xs, ds, 0.0, dict.fromkeys(names, 0.0))
    shapes = [TargetShape(name=n, d_in=d_in, d_out=d_out, bias=False, transposed=False, n_params=d_in * d_out) for n in names]
    factors = StoreSettings(kind="factors", seed=0)
    projected = StoreSettings(kind="projected", seed=0, proj_dim=4, proj_blocks=256)

    def best(fn, reps: int = 5) -> float:
        fn()
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return min(out) * 1e3

    print(f"host work per piece, Llama-2-7B shapes (T = {T}, {n_targets} x down_proj {d_in} -> {d_out}), ms:")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        norms = best(lambda: [factored_sq_norm(xs[n], ds[n]) for n in names])
        wf, wp = ShardWriter(factors, shapes), ShardWriter(projected, shapes)  # the sketches are drawn once, here
        enc_f = best(lambda: wf.add(0, pf))
        enc_p = best(lambda: wp.add(0, pf), reps=3)
        w = ShardWriter(factors, shapes)
        for r in range(16):
            w.add(r, pf)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            entry = w.flush(Path(d) / "shard.pt")
            write = (time.perf_counter() - t) / 16 * 1e3
        print(f"  {threads} thread(s): norms {norms:.1f}, factors encoding {enc_f:.1f}, shard write {write:.1f} "
              f"({entry.bytes / 16:,.0f} bytes/piece), projected encoding {enc_p:.1f}")


if __name__ == "__main__":
    activations()
    host_work()
