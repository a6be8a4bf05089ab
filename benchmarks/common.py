"""Shared helpers of the benchmarks: the piece set, its encoding and batches, machine facts.

Every method scores exactly the same token sequences: pieces are rendered with the default
``RunConfig`` prompt template and tokenized by :func:`gradcouple.scoring.encode_pieces`, the
code path ``gradcouple extract`` itself uses.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
DATASETS = ("musique", "hotpotqa", "mquake-hard")


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes.

    Linux keeps ``ru_maxrss`` across ``execve``, so a child started by a big parent reports
    the parent's peak; ``VmHWM`` (the high-water mark of this address space) does not, and
    equals ``ru_maxrss`` when the parent is small. Falls back to ``ru_maxrss`` elsewhere.
    """
    from gradcouple.runinfo import peak_rss_bytes

    return peak_rss_bytes()


def prepare_pieces(work: Path, n: int) -> Path:
    """Write ``work/pieces.jsonl``: ``n`` real pieces from the bundled samples, spread evenly
    over the merged MuSiQue + HotpotQA + MQuAKE sample (so every dataset is represented)."""
    from gradcouple.pieces import read_pieces, write_pieces
    from gradcouple.stages.pipeline import sample_pieces

    allp = read_pieces(sample_pieces(work / "data", DATASETS))
    if n > len(allp):
        raise SystemExit(f"--pieces {n}: the bundled samples hold only {len(allp)} pieces")
    idx = [round(i * len(allp) / n) for i in range(n)]
    path = work / "pieces.jsonl"
    write_pieces(path, [allp[i] for i in idx])
    return path


def file_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load(model_name: str):
    """(LoadedModel, targets) on CPU, float32, eval, frozen — as gradcouple loads it."""
    from gradcouple.config import RunConfig
    from gradcouple.layers import select_targets
    from gradcouple.models import load_model

    cfg = RunConfig()
    loaded = load_model(model_name, device="cpu")
    return loaded, select_targets(loaded.model, cfg.model.layers, cfg.model.module)


def encode_all(loaded, pieces_path: Path):
    """EncodedPiece per line of ``pieces_path`` (default template, default max_length)."""
    from gradcouple.config import RunConfig
    from gradcouple.scoring import encode_pieces
    from gradcouple.pieces import read_pieces

    cfg = RunConfig()
    return encode_pieces(loaded.tokenizer, read_pieces(pieces_path), cfg.data.prompt_template, cfg.extract.max_length)


def sorted_batches(encoded, batch_size: int) -> list[list[int]]:
    """Piece indices, length-sorted as gradcouple extract sorts them, in chunks of ``batch_size``."""
    order = sorted(range(len(encoded)), key=lambda i: (encoded[i].n_inputs, i))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def flat_grad(targets, grads: dict) -> torch.Tensor:
    """Concatenate per-target (d_out, d_in[+1]) gradients, in target order, flattened."""
    return torch.cat([grads[t.name].reshape(-1) for t in targets])


def cosine_rows(rows: torch.Tensor) -> torch.Tensor:
    """The seed's recipe, in float32: normalise every row, stack, one matrix product.

    (N, P) -> (N, N), returned as float64. torch's float32 norm over millions of elements is
    off by ~1e-4 relative, so even the diagonal misses 1 by that much.
    """
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (rows @ rows.t()).double()


def cosine_rows_careful(rows: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Cosines of float32 rows with float64 accumulation: float32 matmuls over column chunks of
    ``chunk``, summed in float64; norms from the float64 Gram diagonal. (N, P) -> (N, N) float64."""
    G = torch.zeros(rows.shape[0], rows.shape[0], dtype=torch.float64)
    for k in range(0, rows.shape[1], chunk):
        r = rows[:, k:k + chunk]
        G += (r @ r.t()).double()
    n = G.diagonal().sqrt().clamp_min(1e-300)
    return G / (n[:, None] * n[None, :])


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "gradcouple", "opacus", "numpy", "scipy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram = psutil.virtual_memory().total
    except ImportError:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "ram_bytes": ram, "os": platform.platform()}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def projection_config() -> dict:
    """The library's default ``projected`` store settings: {"k": proj_dim, "blocks": proj_blocks, "seed": seed}."""
    from gradcouple.config import ExtractConfig

    cfg = ExtractConfig()
    return {"k": cfg.proj_dim, "blocks": cfg.proj_blocks, "seed": cfg.seed}


def store_settings(store: str, proj: dict | None = None):
    """``StoreSettings`` of ``store`` as ``extract`` records them: projection sizes only for ``projected``
    (``proj`` = {"k", "blocks", "seed"}, default :func:`projection_config`)."""
    from gradcouple.artifacts import StoreSettings

    proj = proj or projection_config()
    projected = store == "projected"
    return StoreSettings(kind=store, proj_dim=proj["k"] if projected else None,
                         proj_blocks=proj["blocks"] if projected else None, seed=proj.get("seed", 0))


def bytes_per_piece(manifest) -> float:
    """Shard bytes per piece of a gradient ``Manifest`` (what its shard entries record)."""
    return sum(s.bytes for s in manifest.shards) / len(manifest.pieces)
