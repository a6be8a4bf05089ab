"""One benchmarked method per process: ``python benchmarks/methods.py METHOD --work DIR --out R.json``.

Methods (all on the same pieces, model and target layers; see benchmarks/README.md):

* ``reference`` float64 model, plain autograd, one piece per backward, full logits, float64
  Gram and norms: the cosines every other method is scored against.
* ``seed``      the seed prototype's recipe: every parameter requires grad, one piece at a
  time, full forward with all logits, backward, flatten the target grads, normalise, stack,
  one matrix product.
* ``torchfunc`` ``torch.func`` per-example gradients (functional_call + vmap(grad)) of the
  target weights, batches of 16, with a prepared additive 4-D causal+padding mask and
  logits only at the scored positions.
* ``opacus``    Opacus ``GradSampleModule`` per-sample gradients of the target weights
  (``train()`` mode, sum reduction), batches of 16.
  torchfunc and opacus form cosines with float64 accumulation (``cosine_rows_careful``), so
  their error measures the per-example gradients, not a float32 norm.
* ``gc-factors`` / ``gc-dense`` / ``gc-projected``: ``gradcouple.extract`` + ``couple`` with
  that store (fp16 shards on disk, full cosine matrix).
* ``floor``     batched ``answer_logprob`` under ``torch.no_grad()``: forward only, logits only
  at the scored positions.
* ``profile``   gradcouple's factors extract + couple, split by stage with perf_counter.

Timing excludes model loading and tokenization-free setup: the clock runs from the first
batch to the cosine matrix. Peak RSS is this process's VmHWM (model load included).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from gradcouple.scoring import answer_logprob, collate  # noqa: E402


def _target_params(targets) -> list[tuple[str, str, torch.nn.Parameter]]:
    """(target name, 'weight'|'bias', parameter) in target order."""
    out = []
    for t in targets:
        out.append((t.name, "weight", t.module.weight))
        if t.has_bias:
            out.append((t.name, "bias", t.module.bias))
    return out


def _as_matrix(t, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Gradient laid out (..., d_out, d_in[+1]) from a weight (and bias) gradient (leading dims kept)."""
    w = weight.transpose(-1, -2) if t.transposed else weight
    if bias is not None:
        w = torch.cat([w, bias.unsqueeze(-1)], dim=-1)
    return w


def _n_params(targets) -> int:
    return sum(t.n_params for t in targets)


def _timed(reps: int, fn):
    """Run ``fn`` ``reps`` times; return (best seconds, all seconds, last result)."""
    times, res = [], None
    for _ in range(reps):
        res = None
        gc.collect()
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, res


# ---------------------------------------------------------------- reference (float64)

def run_reference(loaded, targets, encoded, args) -> dict:
    model = loaded.model.double()
    params = [p for _, _, p in _target_params(targets)]
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    rows, lps = [], []
    for e in encoded:
        ids = torch.tensor([e.ids])
        logits = model(input_ids=ids, use_cache=False).logits[0]
        lp = logits[:-1].double().log_softmax(-1)
        a = e.answer_start
        total = lp[torch.arange(a - 1, len(e.ids) - 1), ids[0, a:]].sum()
        grads = torch.autograd.grad(total, params)
        k, parts = 0, []
        for t in targets:
            gw = grads[k]; k += 1
            gb = None
            if t.has_bias:
                gb = grads[k]; k += 1
            parts.append(_as_matrix(t, gw, gb).reshape(-1).double())
        rows.append(torch.cat(parts))
        lps.append(float(total))
    F = torch.stack(rows)
    del rows
    G = F @ F.t()
    n = G.diagonal().sqrt()
    cos = G / (n[:, None] * n[None, :])
    return {"seconds": time.perf_counter() - t0, "cosine": cos, "gram": G, "logprob": lps}


# ---------------------------------------------------------------- seed prototype

def run_seed(loaded, targets, encoded, args) -> dict:
    model = loaded.model
    model.requires_grad_(True)  # as the seed did: every parameter requires grad
    P = _n_params(targets)

    def once():
        rows = torch.empty(len(encoded), P)
        for i, e in enumerate(encoded):
            model.zero_grad(set_to_none=True)
            ids = torch.tensor([e.ids])
            logits = model(input_ids=ids, use_cache=False).logits[0]
            lp = logits[:-1].float().log_softmax(-1)
            a = e.answer_start
            lp[torch.arange(a - 1, len(e.ids) - 1), ids[0, a:]].sum().backward()
            grads = {}
            for t in targets:
                b = t.module.bias.grad if t.has_bias else None
                grads[t.name] = _as_matrix(t, t.module.weight.grad, b)
            rows[i] = common.flat_grad(targets, grads)
        return common.cosine_rows(rows)

    best, times, cos = _timed(args.reps, once)
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return {"seconds": best, "all_seconds": times, "cosine": cos, "batch_size": 1, "order": "piece order"}


# ---------------------------------------------------------------- torch.func

class _Scorer(torch.nn.Module):
    """Sum of answer-token log-probs of ONE example (inside vmap): logits only at ``pos``."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask4, pos, tgt, w):
        out = self.lm.base_model(input_ids=ids, attention_mask=mask4, use_cache=False)
        h = out[0] if isinstance(out, tuple) else out.last_hidden_state
        logits = self.lm.get_output_embeddings()(h[0][pos]).float()
        lp = logits.log_softmax(-1).gather(1, tgt[:, None])[:, 0]
        return (lp * w).sum()


def _vmap_inputs(encoded, chunk, pad, dtype):
    """Right-padded ids (B, T), additive causal+padding mask (B, 1, T, T) and per-example scored
    positions padded to the batch's max answer length: pos, tgt (B, M) int64, w (B, M) 0/1."""
    batch = collate([encoded[i] for i in chunk], pad)
    B, T = batch.input_ids.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal[None] & batch.attention_mask.bool()[:, None, :]
    mask4 = torch.zeros(B, 1, T, T, dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    M = max(encoded[i].n_answer_tokens for i in chunk)
    pos = torch.zeros(B, M, dtype=torch.long)
    tgt = torch.zeros(B, M, dtype=torch.long)
    w = torch.zeros(B, M)
    for b, i in enumerate(chunk):
        e = encoded[i]
        m = e.n_answer_tokens
        pos[b, :m] = torch.arange(e.answer_start - 1, len(e.ids) - 1)
        tgt[b, :m] = torch.tensor(e.ids[e.answer_start:])
        w[b, :m] = 1.0
    return batch.input_ids, mask4, pos, tgt, w


def run_torchfunc(loaded, targets, encoded, args) -> dict:
    from torch.func import functional_call, grad, vmap

    model = loaded.model
    scorer = _Scorer(model)
    names = {f"lm.{t.name}.{kind}": (t.name, kind) for t in targets for kind in (["weight", "bias"] if t.has_bias else ["weight"])}
    pmap = dict(scorer.named_parameters())
    params = {n: pmap[n].detach() for n in names}

    def loss(p, ids, mask4, pos, tgt, w):
        return functional_call(scorer, p, (ids[None], mask4[None], pos, tgt, w))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0, 0))
    batches = common.sorted_batches(encoded, args.batch_size)
    pad = loaded.pad_id
    P = _n_params(targets)
    dtype = next(model.parameters()).dtype

    def once():
        rows = torch.empty(len(encoded), P)
        for chunk in batches:
            g = per_example(params, *_vmap_inputs(encoded, chunk, pad, dtype))
            by_t = {}
            for t in targets:
                b = g[f"lm.{t.name}.bias"] if t.has_bias else None
                by_t[t.name] = _as_matrix(t, g[f"lm.{t.name}.weight"], b)
            rows[chunk] = torch.cat([by_t[t.name].flatten(1) for t in targets], dim=1)
        return common.cosine_rows_careful(rows)

    best, times, cos = _timed(args.reps, once)
    return {"seconds": best, "all_seconds": times, "cosine": cos, "batch_size": args.batch_size, "order": "length-sorted"}


# ---------------------------------------------------------------- opacus

def run_opacus(loaded, targets, encoded, args) -> dict:
    from opacus import GradSampleModule

    model = loaded.model
    for _, _, p in _target_params(targets):
        p.requires_grad_(True)
    # strict=False: LLaMA's rotary embedding holds a buffer (no parameters; harmless here).
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    gsm.train()  # opacus 1.6 captures nothing in eval(); LLaMA has no dropout, so train() == eval()
    batches = common.sorted_batches(encoded, args.batch_size)
    pad = loaded.pad_id
    P = _n_params(targets)

    def once():
        rows = torch.empty(len(encoded), P)
        for chunk in batches:
            batch = collate([encoded[i] for i in chunk], pad)
            answer_logprob(model, batch).sum().backward()
            by_t = {}
            for t in targets:
                b = t.module.bias.grad_sample if t.has_bias else None
                by_t[t.name] = _as_matrix(t, t.module.weight.grad_sample, b)
            rows[chunk] = torch.cat([by_t[t.name].flatten(1) for t in targets], dim=1)
            gsm.zero_grad(set_to_none=True)
        return common.cosine_rows_careful(rows)

    best, times, cos = _timed(args.reps, once)
    return {"seconds": best, "all_seconds": times, "cosine": cos, "batch_size": args.batch_size, "order": "length-sorted"}


# ---------------------------------------------------------------- gradcouple

def _gc_cfg(args, store: str):
    from gradcouple.config import RunConfig

    cfg = RunConfig()
    cfg.data.pieces = Path(args.work) / "pieces.jsonl"
    cfg.model.name = args.model
    cfg.model.device = "cpu"
    cfg.extract.store = store
    cfg.extract.batch_size = args.batch_size
    return cfg


def run_gradcouple(loaded, targets, encoded, args, store: str) -> dict:
    from gradcouple.stages.couple import couple
    from gradcouple.stages.extract import extract
    from gradcouple.rundir import RunDir

    cfg = _gc_cfg(args, store)
    run = RunDir(Path(args.work) / f"gc-{store}")
    splits = []

    def once():
        shutil.rmtree(run.root, ignore_errors=True)
        t0 = time.perf_counter()
        extract(cfg, run.root, loaded=loaded, overwrite=True, show_progress=False)
        t1 = time.perf_counter()
        couple(cfg, run.root, show_progress=False)
        t2 = time.perf_counter()
        splits.append({"extract_s": t1 - t0, "couple_s": t2 - t1})
        return run.coupling.load_cosine()[1]

    best, times, cos = _timed(args.reps, once)
    man = run.gradients.load_manifest()
    records = man.records()
    k = times.index(best)
    return {"seconds": best, "all_seconds": times, "cosine": cos, "batch_size": args.batch_size, "order": "length-sorted",
            "bytes_per_piece": common.bytes_per_piece(man), "mean_tokens": sum(r.n_inputs for r in records) / len(records),
            "extract_s": splits[k]["extract_s"], "couple_s": splits[k]["couple_s"],
            "extract_loop_pieces_per_s": man.timing.pieces_per_s, "run_dir": str(run.root)}


# ---------------------------------------------------------------- forward-only floor

def run_floor(loaded, targets, encoded, args) -> dict:
    model = loaded.model
    batches = common.sorted_batches(encoded, args.batch_size)
    pad = loaded.pad_id

    def once():
        with torch.no_grad():
            for chunk in batches:
                answer_logprob(model, collate([encoded[i] for i in chunk], pad))

    best, times, _ = _timed(args.reps, once)
    return {"seconds": best, "all_seconds": times, "cosine": None, "batch_size": args.batch_size, "order": "length-sorted"}


# ---------------------------------------------------------------- profile of gradcouple factors

def run_profile(loaded, targets, encoded, args) -> dict:
    """Where gradcouple's time goes: batch_factors and ShardWriter unrolled with perf_counter
    splits (same operations, same order), then couple's parts."""
    from gradcouple.artifacts import Inputs, Manifest, PieceRecord
    from gradcouple.capture import FactorCapture
    from gradcouple.config import RunConfig
    from gradcouple.pairs import pair_split, upper_pairs
    from gradcouple.stages.couple import memory_budget
    from gradcouple.gradients import PieceFactors, factored_sq_norm
    from gradcouple.gram import cosine_from_gram, fit_block_size, gram_diagonal, gram_matrix, plan_methods
    from gradcouple.pieces import read_pieces
    from gradcouple.rundir import RunDir
    from gradcouple.stores import GradientReader, ShardWriter

    cfg = RunConfig()
    model = loaded.model
    pieces = read_pieces(Path(args.work) / "pieces.jsonl")
    batches = common.sorted_batches(encoded, args.batch_size)
    pad = loaded.pad_id
    shapes = [t.shape_info() for t in targets]
    settings = common.store_settings("factors")
    run = RunDir(Path(args.work) / "profile")
    shutil.rmtree(run.root, ignore_errors=True)
    run.gradients.dir.mkdir(parents=True)
    best: dict | None = None
    for _ in range(args.reps):
        s = dict.fromkeys(["collate", "forward_no_grad", "forward_capture", "backward", "factor_copy", "norms",
                           "shard_add_fp16", "shard_flush"], 0.0)
        writer = ShardWriter(settings, shapes)
        records: list = [None] * len(encoded)
        fp32 = {}
        t_all = time.perf_counter()
        for chunk in batches:
            t = time.perf_counter()
            batch = collate([encoded[i] for i in chunk], pad)
            s["collate"] += time.perf_counter() - t
            t = time.perf_counter()
            with torch.no_grad():
                answer_logprob(model, batch)
            s["forward_no_grad"] += time.perf_counter() - t
            with FactorCapture(targets) as cap:
                t = time.perf_counter()
                with torch.enable_grad():
                    lp = answer_logprob(model, batch)
                    s["forward_capture"] += time.perf_counter() - t
                    t = time.perf_counter()
                    lp.sum().backward()
                    s["backward"] += time.perf_counter() - t
                t = time.perf_counter()
                inputs = {tg.name: cap.inputs[tg.name].float().cpu() for tg in targets}
                grads = {tg.name: cap.grads[tg.name].float().cpu() for tg in targets}
            lps = lp.detach().double().cpu().tolist()
            pfs, tn = [], 0.0
            for b, n in enumerate(batch.lengths.tolist()):
                xs, ds = {}, {}
                for tg in targets:
                    x = inputs[tg.name][b, :n]
                    if tg.has_bias:
                        x = torch.cat([x, torch.ones(n, 1)], dim=1)
                    xs[tg.name], ds[tg.name] = x.contiguous(), grads[tg.name][b, :n].contiguous()
                t2 = time.perf_counter()
                norms = {tg.name: factored_sq_norm(xs[tg.name], ds[tg.name]) for tg in targets}
                tn += time.perf_counter() - t2
                pfs.append(PieceFactors(xs, ds, lps[b], norms))
            s["factor_copy"] += time.perf_counter() - t - tn
            s["norms"] += tn
            t = time.perf_counter()
            for i, pf in zip(chunk, pfs):
                fp32[i] = pf
                writer.add(i, pf)
            s["shard_add_fp16"] += time.perf_counter() - t
            for i, pf in zip(chunk, pfs):  # bookkeeping extract does too, not timed
                p, e = pieces[i], encoded[i]
                records[i] = PieceRecord(index=i, id=p.id, question_id=p.question_id, owners=sorted(p.question_ids),
                                         kind=p.kind.value, hop=p.hop, prompt=e.prompt, answer=e.answer,
                                         n_prompt_tokens=e.n_prompt_tokens, n_answer_tokens=e.n_answer_tokens,
                                         n_inputs=e.n_inputs, logprob=pf.logprob, sq_norm=pf.sq_norm, shard=0)
        t = time.perf_counter()
        entry = writer.flush(run.gradients.shard_path(0))
        s["shard_flush"] += time.perf_counter() - t
        s["extract_total"] = time.perf_counter() - t_all - s["forward_no_grad"]
        man = Manifest(inputs=Inputs(values={"pieces": common.file_sha(Path(args.work) / "pieces.jsonl")}),
                       pieces_file=str(Path(args.work) / "pieces.jsonl"), model=loaded.identity(), targets=shapes,
                       n_params=sum(sh.n_params for sh in shapes), store=settings, compute_dtype="float32",
                       config={}, batch_size=args.batch_size, complete=True, shards=[entry], pieces=records)
        run.gradients.save_manifest(man)
        t = time.perf_counter()
        reader = GradientReader(run)
        s["couple_open_verify"] = time.perf_counter() - t
        t = time.perf_counter()
        budget = memory_budget(cfg)
        methods = plan_methods(reader, cfg.couple.method, cfg.couple.block_size)
        bs = fit_block_size(reader, methods, cfg.couple.block_size, budget)
        G = gram_matrix(reader, bs, methods, max_memory=budget)
        s["couple_gram"] = time.perf_counter() - t
        t = time.perf_counter()
        gram_diagonal(reader, bs)
        s["couple_gram_diagonal_topk_only"] = time.perf_counter() - t
        t = time.perf_counter()
        cos = cosine_from_gram(G)
        pairs = upper_pairs(cos)
        pair_split(*pairs, man.records())
        v = pairs[2]
        above = {str(th): [int((v > th).sum()), int((v.abs() > th).sum())] for th in cfg.couple.thresholds}
        s["couple_cosine_stats"] = time.perf_counter() - t
        if best is None or s["extract_total"] < best["extract_total"]:
            best = s
    return {"seconds": best["extract_total"], "cosine": _fp32_factor_cosine(fp32, targets), "splits": best,
            "gram_methods": methods, "block_size": bs, "above_and_abs_above": above}


def _fp32_factor_cosine(factors: dict, targets) -> torch.Tensor:
    """GradSim from the fp32 factors before the fp16 cast: float64 factored Gram, (N, N)."""
    n = len(factors)
    seg = torch.cat([torch.full((factors[i].x[targets[0].name].shape[0],), i) for i in range(n)])
    S = torch.zeros(n, seg.numel(), dtype=torch.float64)
    S[seg, torch.arange(seg.numel())] = 1.0
    G = torch.zeros(n, n, dtype=torch.float64)
    for t in targets:
        X = torch.cat([factors[i].x[t.name] for i in range(n)]).double()
        D = torch.cat([factors[i].d[t.name] for i in range(n)]).double()
        G += S @ ((X @ X.t()) * (D @ D.t())) @ S.t()
    norm = G.diagonal().sqrt()
    return G / (norm[:, None] * norm[None, :])


METHODS = ["reference", "seed", "torchfunc", "opacus", "gc-factors", "gc-dense", "gc-projected", "floor", "profile"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=METHODS)
    ap.add_argument("--work", required=True, help="directory holding pieces.jsonl (written by extract_bench.py)")
    ap.add_argument("--out", required=True, help="result JSON; the cosine matrix goes beside it as .pt")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    loaded, targets = common.load(args.model)
    encoded = common.encode_all(loaded, Path(args.work) / "pieces.jsonl")
    setup_s = time.perf_counter() - t0
    rss_after_load = common.peak_rss()
    fn = {"reference": run_reference, "seed": run_seed, "torchfunc": run_torchfunc, "opacus": run_opacus,
          "floor": run_floor, "profile": run_profile,
          "gc-factors": lambda *a: run_gradcouple(*a, store="factors"),
          "gc-dense": lambda *a: run_gradcouple(*a, store="dense"),
          "gc-projected": lambda *a: run_gradcouple(*a, store="projected")}[args.method]
    res = fn(loaded, targets, encoded, args)
    out = Path(args.out)
    cos = res.pop("cosine")
    extra = {k: res.pop(k) for k in ("gram",) if k in res}
    if cos is not None:
        torch.save({"cosine": cos.double(), **extra, "logprob": res.pop("logprob", None)}, out.with_suffix(".pt"))
        res["cosine_path"] = str(out.with_suffix(".pt"))
    res.update({"method": args.method, "n": len(encoded), "pieces_per_s": len(encoded) / res["seconds"],
                "peak_rss_bytes": common.peak_rss(), "rss_after_load_bytes": rss_after_load, "setup_s": setup_s,
                "n_params": _n_params(targets), "targets": [t.shape_info().model_dump() for t in targets],
                "mean_n_inputs": sum(e.n_inputs for e in encoded) / len(encoded), "threads": torch.get_num_threads()})
    common.write_json(out, res)
    print(f"{args.method}: {res['pieces_per_s']:.2f} pieces/s ({res['seconds']:.2f} s), peak RSS {common.gib(res['peak_rss_bytes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
