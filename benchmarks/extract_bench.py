"""Per-example gradient methods compared on real pieces; writes docs/performance.md.

    python benchmarks/extract_bench.py --pieces 64 --out docs/performance.md

Runs every method of ``benchmarks/methods.py`` in its own process (so peak RSS is per method)
on the same N real pieces (bundled MuSiQue/HotpotQA/MQuAKE samples), the same model
(default SmolLM2-135M, last 4 ``mlp.down_proj``) and this machine; scores each method's
cosines against a float64 reference computed once and cached in ``--work``; measures the
``projected`` store's quality (Spearman against exact cosines, unbiasedness over 20
projection seeds); runs ``benchmarks/couple_bench.py`` (couple scaling on synthetic stores;
``--no-couple-bench`` skips it); and writes the markdown report ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ["seed", "torchfunc", "opacus", "gc-factors", "gc-dense", "gc-projected", "floor", "profile"]
LABELS = {
    "seed": "seed prototype (1 piece/backward, all params require grad, full logits)",
    "torchfunc": "torch.func functional_call + vmap(grad), target layers",
    "opacus": "Opacus GradSampleModule, target layers",
    "gc-factors": "gradcouple extract+couple, `factors` store (exact)",
    "gc-dense": "gradcouple extract+couple, `dense` store (exact)",
    "gc-projected": "gradcouple extract+couple, `projected` store (approximate)",
    "floor": "floor: batched forward, no grad, logits at scored positions only",
}


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def run_child(method: str, args, work: Path, out: Path) -> dict:
    """Run one method in a fresh process; its log goes to work/logs/METHOD.log."""
    cmd = [sys.executable, str(common.BENCH / "methods.py"), method, "--work", str(work), "--out", str(out),
           "--model", args.model, "--batch-size", str(args.batch_size), "--reps", str(args.reps)]
    log = work / "logs" / f"{method}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    la0, t0 = loadavg(), time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0 or not out.is_file():
        tail = log.read_text()[-1500:]
        print(f"  {method}: FAILED (exit {rc}); log {log}\n{tail}", flush=True)
        return {"method": method, "failed": True, "log": str(log), "error_tail": tail}
    res = json.loads(out.read_text())
    res.update({"process_wall_s": wall, "loadavg_before": la0, "loadavg_after": loadavg()})
    print(f"  {method:13s} {res['pieces_per_s']:8.2f} pieces/s  best {res['seconds']:7.2f} s of "
          f"{[round(x, 2) for x in res.get('all_seconds', [res['seconds']])]}  peak RSS {common.gib(res['peak_rss_bytes'])}"
          f"  (process {wall:.0f} s, load {la0:.1f})", flush=True)
    return res


def reference_key(args, pieces_path: Path) -> str:
    import hashlib

    from gradcouple.models import model_fingerprint

    blob = json.dumps({"pieces": common.file_sha(pieces_path), "model": model_fingerprint(args.model), "layers": "last4", "v": 2})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cos_errors(cos, ref) -> dict:
    import torch

    d = (cos.double() - ref).abs()
    off = ~torch.eye(d.shape[0], dtype=torch.bool)
    return {"max_abs_err": float(d.max()), "max_abs_err_offdiag": float(d[off].max()), "mean_abs_err": float(d.mean())}


# ------------------------------------------------------------------ projected-store quality

def spearman_projected(proj_cos, ref_cos) -> dict:
    import torch
    from scipy.stats import pearsonr, spearmanr

    n = ref_cos.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    a, b = proj_cos[iu[0], iu[1]].double().numpy(), ref_cos[iu[0], iu[1]].double().numpy()
    rho = spearmanr(a, b).statistic
    r = pearsonr(a, b).statistic
    # how many of each piece's 5 exact nearest neighbours the projected cosines also rank top-5
    pc, rc = proj_cos.clone().double(), ref_cos.clone().double()
    pc.fill_diagonal_(-2), rc.fill_diagonal_(-2)
    k = 5
    tp, tr = pc.topk(k, dim=1).indices, rc.topk(k, dim=1).indices
    overlap = sum(len(set(tp[i].tolist()) & set(tr[i].tolist())) for i in range(n)) / (n * k)
    return {"pairs": int(iu.shape[1]), "spearman": float(rho), "pearson": float(r),
            "max_abs_err": float((torch.tensor(a) - torch.tensor(b)).abs().max()),
            "mean_abs_err": float((torch.tensor(a) - torch.tensor(b)).abs().mean()), "top5_overlap": overlap}


def load_factors(run_dir: Path) -> tuple[list[dict], list]:
    """Every piece's stored fp16 factors (as float32, with the product of their two scales), in
    pieces.jsonl order, and the store's targets (``TargetShape``)."""
    from gradcouple.rundir import RunDir
    from gradcouple.stores import GradientReader

    reader = GradientReader(RunDir(run_dir))
    facs: list[dict] = [{} for _ in range(reader.n)]
    for r, piece in enumerate(reader.order):
        for nm in reader.names:
            blk = reader.kind.load_block(reader, r, r + 1, nm, "factored")  # x, d float32; s (1, T) = x_scale * d_scale
            facs[piece][nm] = (blk.x, blk.d, float(blk.s[0, 0]))
    return facs, reader.manifest.targets


def exact_gram(facs: list[dict]):
    """Exact float64 Gram of the stored factors: sum((X_i X_j^T) * (D_i D_j^T)) s_i s_j."""
    import torch

    n = len(facs)
    G = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            v = sum(float(((facs[i][nm][0].double() @ facs[j][nm][0].double().t())
                           * (facs[i][nm][1].double() @ facs[j][nm][1].double().t())).sum()) * facs[i][nm][2] * facs[j][nm][2]
                    for nm in facs[i])
            G[i, j] = G[j, i] = v
    return G


def projected_gram(facs: list[dict], targets: list, k: int, blocks: int, seed: int):
    """Gram of the `projected` store's features (its own feature map), float64, from the factors."""
    import torch

    from gradcouple.stores import KroneckerProjection

    rows = []
    maps = {t.name: KroneckerProjection(t.name, t.d_in_aug, t.d_out, k, blocks, seed).from_factors for t in targets}
    for f in facs:
        rows.append(torch.cat([maps[nm](x, d).reshape(-1).double() * s for nm, (x, d, s) in f.items()]))
    F = torch.stack(rows)
    return F @ F.t()


def spearman_offdiag(cos, ref) -> float:
    import torch
    from scipy.stats import spearmanr

    n = ref.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    return float(spearmanr(cos[iu[0], iu[1]].numpy(), ref[iu[0], iu[1]].numpy()).statistic)


def projection_quality(run_dir: Path, ref_cos, default: dict, seeds: int = 20) -> dict:
    """Unbiasedness of the default projection over ``seeds`` seeds for a few pairs, and Spearman
    of equal-size alternatives (k, blocks) against the exact cosines, from the stored factors."""
    import torch

    from gradcouple.gram import cosine_from_gram

    facs, targets = load_factors(run_dir)
    Gx = exact_gram(facs)
    nx = Gx.diagonal().sqrt()
    n = ref_cos.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    srt = ref_cos[iu[0], iu[1]].argsort()
    pick = {"most coupled": int(srt[-1]), "90th percentile": int(srt[int(0.9 * (len(srt) - 1))]),
            "median": int(srt[len(srt) // 2]), "most negative": int(srt[0])}
    pairs = [(name, int(iu[0, j]), int(iu[1, j])) for name, j in pick.items()]
    pairs.append(("self (squared norm)", pairs[0][1], pairs[0][1]))
    k, m = default["k"], default["blocks"]
    grams = [projected_gram(facs, targets, k, m, s) for s in range(seeds)]
    rows = []
    for name, i, j in pairs:
        est = torch.tensor([float(G[i, j] / (nx[i] * nx[j])) for G in grams], dtype=torch.float64)
        ex = float(Gx[i, j] / (nx[i] * nx[j]))
        mean, sd = float(est.mean()), float(est.std())
        se = sd / math.sqrt(seeds)
        z = (mean - ex) / se if se > 0 else 0.0
        rows.append({"pair": name, "i": i, "j": j, "exact": ex, "mean": mean, "se": se, "sd": sd, "z": z, "within_3se": abs(z) <= 3})
    rho_default = [spearman_offdiag(cosine_from_gram(G), ref_cos) for G in grams[:3]]
    numbers = k * k * m
    alts = []
    for kk in (64, 32, 16, 8, 4, 2):
        mm = numbers // (kk * kk)
        if mm < 1 or mm * kk * kk != numbers:
            continue
        rho = [spearman_offdiag(cosine_from_gram(projected_gram(facs, targets, kk, mm, s)), ref_cos) for s in range(3)]
        alts.append({"k": kk, "blocks": mm, "spearman_mean": sum(rho) / len(rho), "spearman_min": min(rho), "spearman_max": max(rho)})
    return {"seeds": seeds, "k": k, "blocks": m, "rows": rows, "all_within_3se": all(r["within_3se"] for r in rows),
            "spearman_default_seeds_0_2": rho_default, "alternatives": alts, "numbers_per_target": numbers,
            "exact_from_fp16_vs_reference_max_err": float((cosine_from_gram(Gx) - ref_cos).abs().max())}


# ------------------------------------------------------------------ report

def fmt_bytes(n) -> str:
    if n is None:
        return "—"
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= f:
            return f"{n / f:.2f} {unit}" if n / f < 10 else f"{n / f:.1f} {unit}"
    return f"{int(n)} B"


def write_report(path: Path, R: dict) -> None:
    res, N = R["results"], R["n"]
    seed_s = res.get("seed", {}).get("seconds")
    floor_s = res.get("floor", {}).get("seconds")
    L = []
    m, v = R["machine"], R["versions"]
    L += ["# Performance", "",
          f"Generated by `{R['command']}` on {R['date']} (UTC). Regenerate with `make bench`.", "",
          "## Machine and versions", "",
          f"- CPU: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable, torch threads {m['torch_threads']}), "
          f"RAM {m['ram_bytes'] / 2**30:.1f} GiB, {m['os']}",
          "- " + ", ".join(f"{k} {val}" for k, val in v.items()),
          f"- Model: `{R['model']}` (SmolLM2-135M-Instruct, float32 on CPU); targets: "
          f"{len(R['targets'])} × `{R['targets'][0]['name'].split('.', 3)[-1]}` "
          f"({R['targets'][0]['d_out']}×{R['targets'][0]['d_in']}), {R['n_params']:,} parameters",
          f"- Pieces: {N} real pieces spread over the bundled MuSiQue, HotpotQA and MQuAKE samples; "
          f"mean {R['mean_n_inputs']:.1f} input tokens; batch size {R['batch_size']}; best of {R['reps']} repetition{'s' if R['reps'] != 1 else ''}", ""]
    L += ["## Per-example gradients and all-pairs cosines", "",
          "Each method runs in its own process. Time runs from the first batch to the finished N×N cosine matrix "
          "(model load excluded; the gradcouple rows include writing and reading the fp16 shards). "
          "`× seed` is the speed-up over the seed prototype's method, `× floor` the time relative to the "
          "forward-only floor. Peak RSS is the process's high-water mark (model load included). The cosine error is "
          "the largest |cos − cos_ref| over all N×N entries against the float64 reference "
          "(float64 model, plain autograd, one piece per backward, full logits, float64 Gram and norms).", "",
          "| method | pieces/s | × seed | time × floor | peak RSS | disk bytes/piece | max \\|cos err\\| |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for k in ["seed", "torchfunc", "opacus", "gc-factors", "gc-dense", "gc-projected", "floor"]:
        r = res.get(k)
        if r is None:
            continue
        if r.get("failed"):
            L.append(f"| {LABELS[k]} | failed (see `{r['log']}`) | | | | | |")
            continue
        sp = f"{seed_s / r['seconds']:.1f}×" if seed_s else "—"
        fl = f"{r['seconds'] / floor_s:.2f}×" if floor_s else "—"
        err = f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else "—"
        L.append(f"| {LABELS[k]} | {r['pieces_per_s']:.2f} | {sp} | {fl} | {fmt_bytes(r['peak_rss_bytes'])} | "
                 f"{fmt_bytes(r.get('bytes_per_piece')) if r.get('bytes_per_piece') else '—'} | {err} |")
    L += ["", "Details (seconds of every repetition; gradcouple split into extract and couple; errors off the diagonal):", "",
          "| method | seconds per repetition | extract s | couple s | max \\|err\\| off-diagonal | mean \\|err\\| | RSS after model load |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for k in ["seed", "torchfunc", "opacus", "gc-factors", "gc-dense", "gc-projected", "floor"]:
        r = res.get(k)
        if not r or r.get("failed"):
            continue
        reps_s = ", ".join(f"{x:.2f}" for x in r.get("all_seconds", [r["seconds"]]))
        ex = f"{r['extract_s']:.2f} | {r['couple_s']:.2f}" if "extract_s" in r else "— | —"
        er = f"{r['max_abs_err_offdiag']:.1e} | {r['mean_abs_err']:.1e}" if "max_abs_err" in r else "— | —"
        L.append(f"| {k} | {reps_s} | {ex} | {er} | {fmt_bytes(r['rss_after_load_bytes'])} |")
    L += ["", "Notes:", "",
          "- The seed's error is float32 normalisation: torch's float32 norm over 3.5 M elements is off by ~1e-4 "
          "relative, so its diagonal misses 1 by that much. torch.func and Opacus cosines here are accumulated in "
          "float64, so their error reflects the gradients themselves (float32 model vs float64 reference).",
          "- gradcouple's exact stores are fp16 on disk (each piece-layer block scaled by its max-abs value); "
          "`projected` is an unbiased random projection, so its error is sampling error, not rounding (see below).",
          "- torch.func under vmap falls back to a per-example loop for the CPU SDPA backward "
          "(no batching rule for `_scaled_dot_product_flash_attention_for_cpu_backward`).",
          "- Peak RSS is `VmHWM`; Linux's `ru_maxrss` carries a parent's peak across `exec`, which would "
          "inflate a child's figure.", ""]
    prof = res.get("profile")
    if prof and not prof.get("failed"):
        s = prof["splits"]
        tot = s["extract_total"]
        L += ["## Where gradcouple's extract time goes", "",
              f"`batch_factors` and `ShardWriter` unrolled with `perf_counter` splits (factors store, {N} pieces, "
              f"batches of {R['batch_size']}, best of {R['reps']}); the forward-only floor of the same batches is "
              f"{s['forward_no_grad']:.3f} s.", "",
              "| stage | seconds | share of extract |", "|---|---:|---:|"]
        names = [("collate", "collate (padding, scored positions)"), ("forward_capture", "forward with capture hooks (grad enabled)"),
                 ("backward", "backward (stops at the lowest target layer)"),
                 ("factor_copy", "factor copy (.float().cpu(), per-piece slices)"), ("norms", "exact norms (float64 ghost norm)"),
                 ("shard_add_fp16", "ShardWriter.add (max-abs scaling, fp16 cast)"), ("shard_flush", "shard flush (torch.save, fsync, sha256)")]
        for key, label in names:
            L.append(f"| {label} | {s[key]:.3f} | {100 * s[key] / tot:.1f}% |")
        L.append(f"| **total** | **{tot:.3f}** | 100% |")
        if prof.get("max_abs_err") is not None:
            L += ["", f"Cosines from these fp32 factors before the fp16 cast (float64 factored Gram) differ from the "
                      f"float64 reference by at most **{prof['max_abs_err']:.1e}** (mean {prof['mean_abs_err']:.1e}); "
                      f"the float32 model's own rounding is most of it."]
        gram_methods = ", ".join(sorted(set(prof.get("gram_methods", {}).values()))) or "auto"
        L += ["", "couple on the same store:", "", "| stage | seconds |", "|---|---:|",
              f"| open store (sha256 of every shard) | {s['couple_open_verify']:.3f} |",
              f"| plan_methods + fit_block_size + gram_matrix (blocked, {gram_methods}) | {s['couple_gram']:.3f} |",
              f"| gram_diagonal (top-k mode only) | {s['couple_gram_diagonal_topk_only']:.3f} |",
              f"| cosine_from_gram + upper_pairs + pair_split + threshold counts | {s['couple_cosine_stats']:.3f} |", ""]
        gf = res.get("gc-factors")
        if gf and not gf.get("failed"):
            L += [f"The full `extract()` + `couple()` call took {gf['seconds']:.2f} s (extract {gf['extract_s']:.2f} s, couple "
                  f"{gf['couple_s']:.2f} s); the difference from the split total is tokenization, manifest and "
                  "config writing, and the pieces file's sha256.", ""]
    q = R.get("projection")
    if q:
        sp, ub = q["spearman"], q["unbiased"]
        k, m = ub["k"], ub["blocks"]
        L += ["## The `projected` store", "",
              f"Library default: k = {k}, blocks = {m} per target: {m} independent {k}×{k} Kronecker sketches "
              f"P_out,b G P_in,b^T, {ub['numbers_per_target']:,} numbers per target, "
              f"{R['n_params'] // (len(R['targets']) * ub['numbers_per_target'])}× fewer than the dense gradient.", "",
              f"- Spearman's rho between projected (the `gc-projected` run's cosines, through the fp16 store) and exact "
              f"cosines over the {sp['pairs']:,} off-diagonal pairs of the {N} real pieces: **{sp['spearman']:.3f}** "
              f"(Pearson {sp['pearson']:.3f}; mean |error| {sp['mean_abs_err']:.3f}, max {sp['max_abs_err']:.3f}; "
              f"{100 * sp['top5_overlap']:.0f}% of each piece's 5 nearest neighbours kept).",
              f"- Unbiasedness: inner products of {len(ub['rows'])} pairs under {ub['seeds']} projection seeds "
              f"(the store's own feature map, `gradcouple.stores.KroneckerProjection`, seeds 0..{ub['seeds'] - 1}), "
              f"from the stored fp16 factors, divided by the exact |g_i||g_j| of the same factors. "
              f"All within 3 standard errors: **{'yes' if ub['all_within_3se'] else 'NO'}**.", "",
              "| pair | exact | mean over seeds | s.e. | s.d. of one projection | z |", "|---|---:|---:|---:|---:|---:|"]
        for r in ub["rows"]:
            L.append(f"| {r['pair']} ({r['i']}, {r['j']}) | {r['exact']:.4f} | {r['mean']:.4f} | {r['se']:.4f} | {r['sd']:.4f} | {r['z']:+.2f} |")
        if ub.get("alternatives"):
            L += ["", f"Equal-size alternatives ({ub['numbers_per_target']:,} numbers per target), Spearman's rho against exact "
                  "cosines over the same pairs, computed from the stored factors for projection seeds 0, 1, 2 (mean [min, max]):", "",
                  "| k | blocks | Spearman |", "|---:|---:|---|"]
            for a in ub["alternatives"]:
                mark = " (default)" if (a["k"], a["blocks"]) == (k, m) else ""
                L.append(f"| {a['k']} | {a['blocks']}{mark} | {a['spearman_mean']:.3f} [{a['spearman_min']:.3f}, {a['spearman_max']:.3f}] |")
        L.append("")
    d = R.get("disk")
    if d:
        L += ["## Disk per piece", "",
              f"At this model's shapes ({len(R['targets'])} targets, d_in {d['d_in']}, d_out {d['d_out']}, mean T = "
              f"{d['T']:.1f} stored positions), fp16:", "",
              "| store | predicted bytes/piece | measured bytes/piece (shard files) |", "|---|---:|---:|",
              f"| factors: L·T·(d_in + d_out)·2 | {d['factors_pred']:,.0f} | {d['factors_meas']:,.0f} |",
              f"| dense: L·d_in·d_out·2 | {d['dense_pred']:,.0f} | {d['dense_meas']:,.0f} |",
              f"| projected: L·blocks·k²·2 | {d['proj_pred']:,.0f} | {d['proj_meas']:,.0f} |", "",
              f"factors are {d['dense_meas'] / d['factors_meas']:.1f}× smaller than dense here "
              f"(break-even at T = d_in·d_out/(d_in+d_out) = {d['breakeven_T']:.0f} tokens).", "",
              "Llama-2-7B (d_model 4096, d_ff 11008; `down_proj`: d_in 11008, d_out 4096), T = 32 tokens, fp16, per layer:", "",
              f"- factors: 32 × (11008 + 4096) × 2 = {32 * (11008 + 4096) * 2:,} bytes ({32 * (11008 + 4096) * 2 / 2**20:.2f} MiB)",
              f"- dense: 11008 × 4096 × 2 = {11008 * 4096 * 2:,} bytes ({11008 * 4096 * 2 / 2**20:.1f} MiB)",
              f"- ratio {11008 * 4096 / (32 * (11008 + 4096)):.1f}×; for the default 4 layers {4 * 32 * (11008 + 4096) * 2 / 2**20:.1f} MiB "
              f"vs {4 * 11008 * 4096 * 2 / 2**20:.0f} MiB per piece, i.e. 100,000 pieces take "
              f"{1e5 * 4 * 32 * (11008 + 4096) * 2 / 2**40:.2f} TiB vs {1e5 * 4 * 11008 * 4096 * 2 / 2**40:.1f} TiB "
              f"(projected, 4,096 numbers per target: {1e5 * 4 * 4096 * 2 / 2**30:.1f} GiB).", ""]
    c = R.get("couple_bench")
    if c:
        L += ["## couple scaling (synthetic stores)", "",
              f"`{c['command']}`: synthetic shards written with `ShardWriter` for SmolLM2-135M shapes "
              f"({len(c['shapes'])} × down_proj, d_in {c['shapes'][0]['d_in']}, d_out {c['shapes'][0]['d_out']}, T uniform "
              f"{c['t_range'][0]}..{c['t_range'][1]}, mean 20), random values. Each `couple(cfg, run_dir)` runs in a fresh "
              "process; peak RSS is that process's (≈ 0.2 GiB of it is importing torch).", "",
              "| N | store | what | wall time | peak RSS | disk bytes/piece |", "|---:|---|---|---:|---:|---:|"]
        for r in c["rows"]:
            if "seconds" in r:
                L.append(f"| {r['n']:,} | {r['store']} | {r['what']} | {r['seconds']:.1f} s | {fmt_bytes(r['peak_rss_bytes'])} | "
                         f"{fmt_bytes(r['bytes_per_piece'])} |")
            else:
                L.append(f"| {r['n']:,} | {r['store']} | {r['what']} | not run: estimated {r['estimated_s']:,.0f} s "
                         f"(≈ {r['estimated_s'] / 3600:.1f} h) | — | — |")
        if c.get("factors_full_estimated_from"):
            n0, s0 = c["factors_full_estimated_from"]
            nmax = max(int(x) for x in c["factors_full_estimates"])
            est = c["factors_full_estimates"][str(nmax)]
            L += ["", f"Estimates scale the largest measured full `factors` run (N = {n0:,}, {s0:.1f} s) by (N/{n0:,})²: "
                  f"the factored Gram costs T²(d_in + d_out) per pair and target, so it is quadratic in N. "
                  f"At N = {nmax:,} the exact `factors` matrix would take ≈ {est / 3600:.1f} h on this machine "
                  f"(its {nmax:,}² float64 result alone is {nmax * nmax * 8 / 2**30:.1f} GiB; `couple` switches to top-k "
                  "when 3 N² float64 exceed a quarter of RAM). At that scale use `projected` with `--top-k`, or split "
                  "rows across ranks."]
        L.append("")
    L += ["## GPU", "",
          "`benchmarks/gpu.sh` (offline, under 8 minutes) builds Llama-2-7B's config with random bf16 weights and GPT-2 "
          "small's config with random weights, makes synthetic token pieces (random ids, 16-48 tokens, 1-4 answer tokens) "
          "and prints pieces/s of `gradcouple extract` (factors) against the forward-only floor, with peak GPU memory "
          "(`torch.cuda.max_memory_allocated`). `benchmarks/gpu.sh --tiny` runs the same code on CPU with tiny configs."]
    g = R.get("gpu")
    if g:
        L += ["", f"Results on {g['device']} (torch {g['torch']}):", "",
              "| model | dtype | pieces | extract pieces/s | floor pieces/s | extract time / floor | peak GPU extract | peak GPU floor | disk/piece |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in g["rows"]:
            L.append(f"| {r['model']} | {r['dtype']} | {r['pieces']} | {r['extract_pieces_per_s']:.1f} | {r['floor_pieces_per_s']:.1f} | "
                     f"{r['floor_pieces_per_s'] / r['extract_pieces_per_s']:.2f}× | {fmt_bytes(r['extract_peak_gpu_bytes'])} | "
                     f"{fmt_bytes(r['floor_peak_gpu_bytes'])} | {fmt_bytes(r['bytes_per_piece'])} |")
    else:
        L += ["", "Not run for this report (no GPU on this machine); pass `--gpu-json` with the output of "
              "`benchmarks/gpu.sh --json FILE` to include its numbers."]
    L.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    from sections import carried

    kept = carried(path)  # sections other benchmarks own (soak, processes) survive a rerun
    path.write_text("\n".join(L) + ("\n\n" + kept if kept else ""))


def print_summary(R: dict) -> None:
    res = R["results"]
    seed_s = res.get("seed", {}).get("seconds")
    floor_s = res.get("floor", {}).get("seconds")
    print(f"\n{'method':13s} {'pieces/s':>9s} {'x seed':>7s} {'x floor':>8s} {'peak RSS':>9s} {'bytes/piece':>12s} {'max|cos err|':>12s}")
    for k in ["seed", "torchfunc", "opacus", "gc-factors", "gc-dense", "gc-projected", "floor"]:
        r = res.get(k)
        if not r or r.get("failed"):
            continue
        print(f"{k:13s} {r['pieces_per_s']:9.2f} {(seed_s / r['seconds'] if seed_s else float('nan')):6.1f}x "
              f"{(r['seconds'] / floor_s if floor_s else float('nan')):7.2f}x {r['peak_rss_bytes'] / 2**30:6.2f} GiB "
              f"{fmt_bytes(r.get('bytes_per_piece')) if r.get('bytes_per_piece') else '-':>12s} "
              f"{(format(r['max_abs_err'], '.1e') if 'max_abs_err' in r else '-'):>12s}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pieces", type=int, default=64, help="how many real pieces (at most the bundled 137)")
    ap.add_argument("--out", type=Path, default=Path("docs/performance.md"), help="markdown report")
    ap.add_argument("--work", type=Path, default=Path("runs/bench"), help="scratch dir (stores, logs, cached reference)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2, help="repetitions of each timed section (best is reported)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--no-couple-bench", action="store_true", help="skip benchmarks/couple_bench.py")
    ap.add_argument("--couple-sizes", default="1000,4000,16000")
    ap.add_argument("--keep", action="store_true", help="keep the dense store's shards in --work")
    ap.add_argument("--gpu-json", type=Path, default=None, help="results of `benchmarks/gpu.sh --json FILE` to include")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    pieces_path = common.prepare_pieces(work, args.pieces)
    key = reference_key(args, pieces_path)
    ref_json = work / f"reference-{key}.json"
    print(f"{args.pieces} pieces -> {pieces_path}", flush=True)
    if ref_json.is_file() and ref_json.with_suffix(".pt").is_file():
        print(f"  reference      cached ({ref_json.with_suffix('.pt')})", flush=True)
        ref_meta = json.loads(ref_json.read_text())
    else:
        ref_meta = run_child("reference", argparse.Namespace(**{**vars(args), "reps": 1}), work, ref_json)
        if ref_meta.get("failed"):
            raise SystemExit("the float64 reference failed; see its log")

    results: dict[str, dict] = {}
    for m in [x for x in args.methods.split(",") if x]:
        results[m] = run_child(m, args, work, work / f"result-{m}.json")

    couple_res = None
    if not args.no_couple_bench:
        cjson = work / "couple.json"
        cmd = [sys.executable, str(common.BENCH / "couple_bench.py"), "--sizes", args.couple_sizes,
               "--work", str(work / "couple"), "--json", str(cjson)]
        print("couple scaling:", flush=True)
        if subprocess.run(cmd).returncode == 0:
            couple_res = json.loads(cjson.read_text())
            couple_res["command"] = "python benchmarks/couple_bench.py --sizes " + args.couple_sizes

    # everything below runs after the children, so this process's memory does not matter
    import torch

    ref = torch.load(ref_json.with_suffix(".pt"), weights_only=True)["cosine"]
    for m, r in results.items():
        if r.get("cosine_path"):
            r.update(cos_errors(torch.load(r["cosine_path"], weights_only=True)["cosine"], ref))
    R = {"n": args.pieces, "model": args.model, "batch_size": args.batch_size, "reps": args.reps,
         "command": "python benchmarks/extract_bench.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
         "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "machine": common.machine(),
         "versions": common.versions(), "targets": ref_meta["targets"], "n_params": ref_meta["n_params"],
         "mean_n_inputs": ref_meta["mean_n_inputs"], "reference_seconds": ref_meta.get("seconds"), "results": results,
         "couple_bench": couple_res,
         "gpu": json.loads(args.gpu_json.read_text()) if args.gpu_json and args.gpu_json.is_file() else None}
    gp, gf, gd = results.get("gc-projected", {}), results.get("gc-factors", {}), results.get("gc-dense", {})
    if gp.get("cosine_path") and gf.get("run_dir"):
        R["projection"] = {"spearman": spearman_projected(torch.load(gp["cosine_path"], weights_only=True)["cosine"], ref),
                           "unbiased": projection_quality(Path(gf["run_dir"]), ref, common.projection_config())}
        sp = R["projection"]["spearman"]
        print(f"projected: Spearman {sp['spearman']:.3f}, unbiased within 3 s.e.: {R['projection']['unbiased']['all_within_3se']}")
    if gf.get("bytes_per_piece") and gd.get("bytes_per_piece") and gp.get("bytes_per_piece"):
        t0 = R["targets"][0]
        Lr, T = len(R["targets"]), gf["mean_tokens"]
        R["disk"] = {"d_in": t0["d_in"], "d_out": t0["d_out"], "T": T,
                     "factors_pred": Lr * T * (t0["d_in"] + t0["d_out"]) * 2, "factors_meas": gf["bytes_per_piece"],
                     "dense_pred": Lr * t0["d_in"] * t0["d_out"] * 2, "dense_meas": gd["bytes_per_piece"],
                     "proj_pred": Lr * common.projection_config()["k"] ** 2 * common.projection_config()["blocks"] * 2,
                     "proj_meas": gp["bytes_per_piece"],
                     "breakeven_T": t0["d_in"] * t0["d_out"] / (t0["d_in"] + t0["d_out"])}
    common.write_json(work / "results.json", R)
    write_report(args.out, R)
    print_summary(R)
    if gd.get("run_dir") and not args.keep:  # 7 MB of shards per piece: not worth keeping
        import shutil

        shutil.rmtree(gd["run_dir"], ignore_errors=True)
    print(f"report: {args.out} ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
