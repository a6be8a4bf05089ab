"""Scaling of ``gradcouple couple`` on synthetic gradient stores of real shapes.

    python benchmarks/couple_bench.py --json runs/bench/couple.json

Writes synthetic shards with :class:`gradcouple.stores.ShardWriter` and a manifest for N pieces
of SmolLM2-135M's shapes (4 targets ``mlp.down_proj``, d_in 1536, d_out 576, T uniform in
12..28 tokens, mean 20), then times ``couple(cfg, run_dir)`` in a fresh process per
measurement (so peak RSS is that measurement's):

* ``factors`` store, full N x N matrix, at the smallest N, and at the next sizes while the
  quadratic extrapolation of the previous one stays under ``--factors-budget-s``;
* ``projected`` store (the library's default proj_dim/proj_blocks), ``couple.top_k = 10``, at every N.

The factor values are random (cosines near 0); the timings do not depend on the values.
``extract_bench.py`` runs this script and puts its numbers into docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

D_IN, D_OUT, N_LAYERS = 1536, 576, 4


def targets_shapes(n_layers: int = N_LAYERS, d_in: int = D_IN, d_out: int = D_OUT) -> list:
    from gradcouple.artifacts import TargetShape

    return [TargetShape(name=f"model.layers.{26 + k}.mlp.down_proj", d_in=d_in, d_out=d_out, bias=False,
                        transposed=False, n_params=d_in * d_out) for k in range(n_layers)]


def write_synthetic(run_dirs: dict[str, Path], n: int, shapes: list, seed: int = 0, shard_size: int = 256,
                    proj: dict | None = None, t_min: int = 12, t_max: int = 28) -> dict[str, float]:
    """Write the same N synthetic pieces into one store per entry of ``run_dirs`` ({store: run_dir}).

    ``shapes`` are ``TargetShape``s; ``proj`` = {"k", "blocks"} of the projected store (default: the
    library's defaults). Returns seconds spent per store (generation shared)."""
    proj = {**common.projection_config(), **(proj or {})}
    from gradcouple.artifacts import Inputs, Manifest, ModelIdentity, PieceRecord
    from gradcouple.gradients import PieceFactors
    from gradcouple.rundir import RunDir
    from gradcouple.stores import ShardWriter

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(t_min, t_max + 1, (n,), generator=g).tolist()
    runs = {s: RunDir(d) for s, d in run_dirs.items()}
    settings = {s: common.store_settings(s, proj) for s in run_dirs}
    writers = {s: ShardWriter(settings[s], shapes) for s in run_dirs}
    for run in runs.values():
        shutil.rmtree(run.root, ignore_errors=True)
        run.gradients.dir.mkdir(parents=True)
    shards: dict[str, list] = {s: [] for s in run_dirs}
    spent = dict.fromkeys(run_dirs, 0.0)
    pieces = []
    for k0 in range(0, n, shard_size):
        rows = list(range(k0, min(n, k0 + shard_size)))
        tot = sum(lens[r] for r in rows)
        xs = {t.name: torch.randn(tot, t.d_in, generator=g) for t in shapes}
        ds = {t.name: torch.randn(tot, t.d_out, generator=g) * 1e-3 for t in shapes}
        o = 0
        for r in rows:
            T = lens[r]
            pf = PieceFactors({nm: x[o:o + T] for nm, x in xs.items()}, {nm: d[o:o + T] for nm, d in ds.items()}, 0.0,
                              {nm: 0.0 for nm in xs})
            o += T
            for s, w in writers.items():
                t = time.perf_counter()
                w.add(r, pf)
                spent[s] += time.perf_counter() - t
            qid = f"synthetic:{r // 4}"
            pieces.append(PieceRecord(index=r, id=f"synthetic:{r}", question_id=qid, owners=[qid], kind="single_hop",
                                      prompt=f"p{r}", answer=f"a{r}", n_prompt_tokens=lens[r] - 1, n_answer_tokens=2,
                                      n_inputs=lens[r], logprob=0.0, sq_norm=pf.sq_norm, shard=k0 // shard_size))
        for s, w in writers.items():
            t = time.perf_counter()
            shards[s].append(w.flush(runs[s].gradients.shard_path(k0 // shard_size)))
            spent[s] += time.perf_counter() - t
    for s, run in runs.items():
        run.gradients.save_manifest(Manifest(inputs=Inputs(values={"pieces": f"synthetic:{n}:{seed}"}), pieces_file="synthetic",
                                   model=ModelIdentity(name="synthetic", fingerprint="synthetic"), targets=shapes,
                                   n_params=sum(t.n_params for t in shapes), store=settings[s], compute_dtype="float32",
                                   config={}, batch_size=1, complete=True, shards=shards[s], pieces=pieces))
    return spent


def child(run_dir: Path, top_k: int | None, out: Path) -> None:
    """One couple() run in this process; writes {seconds, peak_rss_bytes, ...} to ``out``."""
    from gradcouple.config import RunConfig
    from gradcouple.stages.couple import couple

    base = common.peak_rss()
    cfg = RunConfig()
    cfg.couple.top_k = top_k
    t = time.perf_counter()
    res = couple(cfg, run_dir, show_progress=False)
    secs = time.perf_counter() - t
    common.write_json(out, {"seconds": secs, "mode": res.mode, "n": res.n, "peak_rss_bytes": common.peak_rss(),
                            "rss_before_bytes": base, "methods": res.stats.methods, "block_size": res.stats.block_size})


def measure(run_dir: Path, top_k: int | None, tmp: Path) -> dict:
    out = tmp / f"m-{run_dir.name}-{top_k}.json"
    cmd = [sys.executable, __file__, "--child", str(run_dir), "--json", str(out), "--top-k", str(top_k or 0)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def bytes_per_piece(run_dir: Path) -> float:
    from gradcouple.rundir import RunDir

    return common.bytes_per_piece(RunDir(run_dir).gradients.load_manifest())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,4000,16000", help="comma-separated N")
    ap.add_argument("--work", default="runs/bench/couple", help="where the synthetic stores go (deleted after)")
    ap.add_argument("--json", default="runs/bench/couple.json", help="results")
    ap.add_argument("--top-k", type=int, default=10, help="k of the projected top-k runs")
    ap.add_argument("--factors-budget-s", type=float, default=180.0,
                    help="run the full factors matrix at a larger N only if the quadratic estimate is below this")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic stores")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.top_k or None, Path(args.json))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shapes = targets_shapes()
    results = {"shapes": [t.model_dump() for t in shapes], "top_k": args.top_k, "proj": common.projection_config(), "t_range": [12, 28], "rows": [],
               "factors_budget_s": args.factors_budget_s}
    prev_full = None  # (N, seconds) of the last full factors run
    for n in sizes:
        want_factors = prev_full is None or prev_full[1] * (n / prev_full[0]) ** 2 <= args.factors_budget_s
        dirs = {"projected": work / f"projected-{n}"}
        if want_factors:
            dirs["factors"] = work / f"factors-{n}"
        t = time.perf_counter()
        spent = write_synthetic(dirs, n, shapes)
        print(f"N={n}: wrote {', '.join(dirs)} stores in {time.perf_counter() - t:.1f} s", flush=True)
        if want_factors:
            r = measure(dirs["factors"], None, work)
            r.update({"n": n, "store": "factors", "what": "full matrix", "bytes_per_piece": bytes_per_piece(dirs["factors"]),
                      "write_s": spent["factors"]})
            results["rows"].append(r)
            prev_full = (n, r["seconds"])
            print(f"  factors full   : {r['seconds']:.1f} s, peak RSS {common.gib(r['peak_rss_bytes'])}", flush=True)
        else:
            est = prev_full[1] * (n / prev_full[0]) ** 2
            results["rows"].append({"n": n, "store": "factors", "what": "full matrix", "estimated_s": est,
                                    "estimated_from": prev_full})
            print(f"  factors full   : skipped, estimated {est:.0f} s from N={prev_full[0]}", flush=True)
        r = measure(dirs["projected"], args.top_k, work)
        r.update({"n": n, "store": "projected", "what": f"top-{args.top_k}",
                  "bytes_per_piece": bytes_per_piece(dirs["projected"]), "write_s": spent["projected"]})
        results["rows"].append(r)
        print(f"  projected top{args.top_k}: {r['seconds']:.1f} s, peak RSS {common.gib(r['peak_rss_bytes'])}", flush=True)
        if not args.keep:
            for d in dirs.values():
                shutil.rmtree(d, ignore_errors=True)
    # 16,000 x 16,000 with factors: extrapolate the largest measured full run
    if prev_full:
        results["factors_full_estimates"] = {str(n): prev_full[1] * (n / prev_full[0]) ** 2 for n in sizes}
        results["factors_full_estimated_from"] = prev_full
    common.write_json(Path(args.json), results)
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
