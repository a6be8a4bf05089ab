"""Soak: extract many pieces in one process and sample its resident memory, to show that
memory stays flat after warm-up (no per-piece growth). Writes the 'soak' section of
docs/performance.md.

    python benchmarks/soak.py --pieces 2000 --model smollm2-135m --threads 2

Extraction sorts pieces by length, so over real pieces RSS follows the growing sequence
length, not the count. To see per-piece growth alone, every piece is the same real piece (the
bundled sample's median-length one) under a new id. RSS is read from /proc/self/statm every
0.2 s; the pieces done so far are counted from the shard files on disk.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import sections  # noqa: E402
from common import DATASETS  # noqa: E402


def rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pieces", type=int, default=2000)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("runs/soak"))
    ap.add_argument("--out", type=Path, default=Path("docs/performance.md"))
    args = ap.parse_args(argv)

    from gradcouple.config import RunConfig
    from gradcouple.stages.extract import extract
    from gradcouple.pieces import read_pieces, write_pieces
    from gradcouple.stages.pipeline import sample_pieces

    shutil.rmtree(args.work, ignore_errors=True)
    real = read_pieces(sample_pieces(args.work / "data", DATASETS))
    median = sorted(real, key=lambda p: len(p.prompt) + len(p.answer))[len(real) // 2]
    pieces = [median.model_copy(update={"id": f"{median.id}#{k}"}) for k in range(args.pieces)]
    write_pieces(args.work / "pieces.jsonl", pieces)
    cfg = RunConfig()
    cfg.data.pieces = args.work / "pieces.jsonl"
    cfg.model.name, cfg.model.threads, cfg.extract.shard_size = args.model, args.threads, args.shard_size
    grads = args.work / "run" / "gradients"
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()

    def sample():
        t0 = time.perf_counter()
        while not stop.is_set():
            done = len(list(grads.glob("shard-*.pt"))) * args.shard_size if grads.is_dir() else 0
            samples.append((time.perf_counter() - t0, min(done, args.pieces), rss_bytes()))
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    res = extract(cfg, args.work / "run", show_progress=False)
    stop.set()
    th.join()

    during = [s for s in samples if s[1] > 0]  # after the first shard: model loaded, buffers warm
    warm = [s for s in during if s[1] <= args.pieces * 0.1] or during[:1]
    late = [s for s in during if s[1] >= args.pieces * 0.9] or during[-1:]
    mib = 2 ** 20
    warm_rss, late_rss, peak = max(s[2] for s in warm), max(s[2] for s in late), max(s[2] for s in during)
    n0, n1 = warm[-1][1], late[-1][1]
    slope = (late_rss - warm_rss) / mib / max(1, n1 - n0) * 1000
    text = "\n".join([
        "## Soak: memory over one long extraction", "",
        f"`python benchmarks/soak.py --pieces {args.pieces} --model {args.model}"
        + (f" --threads {args.threads}" if args.threads else "") + f"` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: "
        f"{res.n_pieces} pieces in {res.n_shards} shards, {res.seconds:.0f} s ({res.pieces_per_s:.1f} pieces/s, "
        f"{res.device.threads if res.device else '?'} threads), RSS sampled every 0.2 s ({len(samples)} samples). "
        f"Every piece is `{median.id}` under a new id, so each batch has the same shape.", "",
        "| | pieces done | RSS |", "|---|---|---|",
        f"| after warm-up (first 10%) | {n0} | {warm_rss / mib:.0f} MiB |",
        f"| end (last 10%) | {n1} | {late_rss / mib:.0f} MiB |",
        f"| peak during extraction | | {peak / mib:.0f} MiB |", "",
        f"Growth after warm-up: {slope:+.1f} MiB per 1,000 pieces "
        f"({'flat' if abs(late_rss - warm_rss) < 0.05 * warm_rss else 'NOT flat'}: within 5% of the warm RSS)."])
    sections.put(args.out, "soak", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
