"""GPU throughput of ``gradcouple extract`` (factors store) against the forward-only floor.

Run through ``benchmarks/gpu.sh`` on a CUDA machine with no network. Builds models from their
configs with random weights (no download): Llama-2-7B (LlamaConfig with its real sizes,
bf16 weights, bf16 autocast) and GPT-2 small (GPT2Config defaults, float32); makes synthetic
token pieces (random ids, 16-48 tokens, 1-4 answer tokens) rendered as words of an in-memory
word-level tokenizer, so the real ``extract()`` path (tokenize, locate the answer by offsets,
length-sort, batch, capture, fp16 shards, manifest) runs unchanged. Prints pieces/s of
``extract`` and of a batched no-grad forward over the same batches (logits only at scored
positions), and peak GPU memory (``torch.cuda.max_memory_allocated``) of each.

Then ``couple --device cuda`` on a synthetic ``factors`` store of ``--couple-n`` pieces (16,000;
SmolLM2-135M's shapes, written by ``couple_bench.write_synthetic``): the full N x N matrix with
the Gram blocks on the GPU, its wall time and peak GPU memory (skipped when the extraction runs
left too little of the time limit).

``--tiny`` swaps in tiny configs of both architectures (runs on CPU in seconds) to prove the
code path.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs from a plain checkout too (no pip install)

from gradcouple.config import RunConfig  # noqa: E402
from gradcouple.scoring import encode_pieces  # noqa: E402
from gradcouple.stages.extract import extract  # noqa: E402
from gradcouple.models import LoadedModel  # noqa: E402
from gradcouple.pieces import KnowledgePiece, write_pieces  # noqa: E402
from gradcouple.rundir import RunDir  # noqa: E402
from gradcouple.scoring import answer_logprob, collate  # noqa: E402


def configs(tiny: bool) -> list[dict]:
    from transformers import GPT2Config, LlamaConfig

    if tiny:
        return [
            {"name": "llama-tiny (Llama-2 architecture)", "dtype": "bfloat16", "pieces": 64,
             "config": LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)},
            {"name": "gpt2-tiny (GPT-2 architecture)", "dtype": "float32", "pieces": 64,
             "config": GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=4, n_head=4,
                                  bos_token_id=1, eos_token_id=1)},
        ]
    return [
        # meta-llama/Llama-2-7b-hf config.json
        {"name": "Llama-2-7B config, random bf16 weights", "dtype": "bfloat16", "pieces": 512,
         "config": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                               rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                               bos_token_id=1, eos_token_id=2)},
        # openai-community/gpt2 config.json (GPT2Config defaults)
        {"name": "GPT-2 small config, random float32 weights", "dtype": "float32", "pieces": 2048,
         "config": GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)},
    ]


def word_tokenizer(vocab_size: int):
    """A fast word-level tokenizer: word ``w<i>`` is token i (offsets work, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["[UNK]"] = vocab_size - 1
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="w0")


def synthetic_pieces(n: int, vocab_size: int, seed: int = 0) -> list[KnowledgePiece]:
    """Random ids (1..V-2), 16-48 tokens each, the last 1-4 of them the answer (cloze kind)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        L = rng.randint(16, 48)
        a = rng.randint(1, 4)
        words = [f"w{rng.randint(1, vocab_size - 2)}" for _ in range(L)]
        out.append(KnowledgePiece(id=f"synthetic:{i}:0", dataset="synthetic", question_id=f"synthetic:{i // 4}", hop=0,
                                  kind="cloze", prompt=" ".join(words[:L - a]), answer=" ".join(words[L - a:])))
    return out


def build_model(spec: dict, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, spec["dtype"]) if device.type == "cuda" else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype, on the device
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(spec["config"])
    finally:
        torch.set_default_dtype(prev)
    return model.to(dtype).eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def floor(loaded, encoded, cfg, device) -> float:
    """Seconds for a batched no-grad forward over the length-sorted batches of extract."""
    order = sorted(range(len(encoded)), key=lambda i: (encoded[i].n_inputs, i))
    bs = cfg.extract.batch_size
    pad = loaded.pad_id
    autocast = device.type == "cuda" and cfg.model.dtype != "float32"
    sync(device)
    t = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=getattr(torch, cfg.model.dtype), enabled=autocast):
        for k in range(0, len(order), bs):
            answer_logprob(loaded.model, collate([encoded[i] for i in order[k:k + bs]], pad).to(device))
    sync(device)
    return time.perf_counter() - t


def bench(spec: dict, device: torch.device, work: Path, batch_size: int, n_override: int | None) -> dict:
    n = n_override or spec["pieces"]
    V = spec["config"].vocab_size
    t = time.perf_counter()
    model = build_model(spec, device)
    build_s = time.perf_counter() - t
    tok = word_tokenizer(V)
    arch = spec["config"].model_type
    loaded = LoadedModel(model=model, tokenizer=tok, name=spec["name"], source="random init (config only)", architecture=arch)
    pieces = synthetic_pieces(n, V)
    data = work / "pieces.jsonl"
    write_pieces(data, pieces)
    cfg = RunConfig()
    cfg.data.pieces = data
    cfg.model.name = spec["name"]
    cfg.model.device = device.type
    cfg.model.dtype = spec["dtype"] if device.type == "cuda" else "float32"
    cfg.extract.store = "factors"
    cfg.extract.batch_size = batch_size
    encoded = encode_pieces(tok, pieces, cfg.data.prompt_template, cfg.extract.max_length)
    assert all(16 <= len(e.ids) <= 48 and 1 <= e.n_answer_tokens <= 4 for e in encoded), "tokenizer did not round-trip the ids"

    # warm-up (CUDA context, cuBLAS handles, allocator) on a few batches of both paths
    wcfg = cfg.model_copy(deep=True)
    wcfg.data.limit = min(n, 2 * batch_size)
    extract(wcfg, work / "warm", loaded=loaded, overwrite=True, show_progress=False)
    shutil.rmtree(work / "warm", ignore_errors=True)
    floor(loaded, encoded[: 2 * batch_size], cfg, device)

    reset_peak(device)
    run = work / "run"
    t = time.perf_counter()
    res = extract(cfg, run, loaded=loaded, overwrite=True, show_progress=False)
    sync(device)
    ex_wall = time.perf_counter() - t
    ex_peak = peak(device)
    loop_pps = RunDir(run).gradients.load_manifest().timing.pieces_per_s  # the batch loop alone (no tokenization, no load)
    shutil.rmtree(run, ignore_errors=True)

    reset_peak(device)
    fl_s = floor(loaded, encoded, cfg, device)
    fl_peak = peak(device)
    n_params = sum(p.numel() for p in model.parameters())
    del model, loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": spec["name"], "params": n_params, "dtype": cfg.model.dtype, "pieces": n, "build_s": build_s,
            "extract_pieces_per_s": loop_pps, "extract_wall_s": ex_wall, "extract_peak_gpu_bytes": ex_peak,
            "bytes_per_piece": res.bytes_on_disk / n, "floor_pieces_per_s": n / fl_s, "floor_s": fl_s,
            "floor_peak_gpu_bytes": fl_peak, "mean_tokens": sum(e.n_inputs for e in encoded) / n}


def bench_couple(device: torch.device, work: Path, n: int) -> dict:
    """couple (full matrix) on a synthetic factors store of ``n`` pieces, Gram blocks on ``device``."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from couple_bench import targets_shapes, write_synthetic

    from gradcouple.stages.couple import couple

    run = work / f"couple-{n}"
    t = time.perf_counter()
    write_synthetic({"factors": run}, n, targets_shapes())
    write_s = time.perf_counter() - t
    cfg = RunConfig()
    cfg.model.device = str(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    res = couple(cfg, run, show_progress=False)
    secs = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    shutil.rmtree(run, ignore_errors=True)
    return {"n": n, "write_s": write_s, "couple_s": secs, "mode": res.mode, "block_size": res.stats.block_size,
            "methods": res.stats.methods, "peak_gpu_bytes": peak}


def gib(b) -> str:
    return "n/a (CPU)" if b is None else f"{b / 2**30:.2f} GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU is fine): prove the code path")
    ap.add_argument("--pieces", type=int, default=None, help="pieces per model (default 512 Llama-2-7B, 2048 GPT-2; 64 tiny)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir for shards (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--couple-n", type=int, default=None, help="pieces of the couple run (default 16000; 256 tiny; 0 skips)")
    ap.add_argument("--couple-after-s", type=float, default=300.0, help="skip couple when the extraction runs took longer")
    args = ap.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        print("no CUDA device: the full-size run needs a GPU (use --tiny to check the code path on CPU)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"device {device} ({gpu}), torch {torch.__version__}, batch size {args.batch_size}", flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gradcouple-gpu-"))
    rows, couple_row = [], None
    t0 = time.perf_counter()
    try:
        for spec in configs(args.tiny):
            w = work / spec["config"].model_type
            w.mkdir(parents=True, exist_ok=True)
            r = bench(spec, device, w, args.batch_size, args.pieces)
            rows.append(r)
            print(f"{r['model']}: {r['params'] / 1e6:,.2f} M params, {r['pieces']} pieces (mean {r['mean_tokens']:.1f} tokens), "
                  f"built in {r['build_s']:.1f} s\n"
                  f"  extract (factors): {r['extract_pieces_per_s']:8.1f} pieces/s  peak GPU {gib(r['extract_peak_gpu_bytes'])}"
                  f"  ({r['bytes_per_piece'] / 2**20:.2f} MiB/piece on disk)\n"
                  f"  forward floor    : {r['floor_pieces_per_s']:8.1f} pieces/s  peak GPU {gib(r['floor_peak_gpu_bytes'])}\n"
                  f"  extract time / floor time: {r['floor_pieces_per_s'] / r['extract_pieces_per_s']:.2f}x", flush=True)
        n_couple = args.couple_n if args.couple_n is not None else (256 if args.tiny else 16000)
        if n_couple and time.perf_counter() - t0 > args.couple_after_s:
            print(f"couple on {n_couple:,} pieces skipped: the extraction runs took {time.perf_counter() - t0:.0f} s "
                  f"(> --couple-after-s {args.couple_after_s:g})", flush=True)
        elif n_couple:
            c = bench_couple(device, work, n_couple)
            couple_row = c
            print(f"couple ({c['mode']}, factors, Gram blocks on {device}): N = {c['n']:,} in {c['couple_s']:.1f} s "
                  f"(store written in {c['write_s']:.1f} s; block size {c['block_size']}; peak GPU "
                  f"{gib(c['peak_gpu_bytes'])})", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": gpu, "torch": torch.__version__, "rows": rows, "couple": couple_row},
                                        indent=2))
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
