"""The ``extract`` stage: per-piece gradients of the answer log-prob into fp16 shards.

Pieces are tokenized, sorted by length (less padding), split into shards of
``extract.shard_size`` and each shard into batches of ``extract.batch_size``. One forward and
one backward per batch yields every piece's exact factors (:mod:`gradcouple.gradients`).
After each shard the manifest is rewritten atomically, so an interrupted extraction resumes
from its last complete shard.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import __version__
from .config import RunConfig, config_diff
from .errors import ConfigError
from .gradients import batch_factors
from .io import sha256_file
from .layers import select_targets
from .models import LoadedModel, load_model
from .pieces import KnowledgePiece, read_pieces, write_pieces
from .runinfo import progress_console, device_info, peak_rss_bytes
from .scoring import EncodedPiece, collate, encode
from .store import GradientStore, Manifest, ShardWriter


@dataclass
class ExtractResult:
    """What ``extract`` did: counts, seconds, throughput (pieces/s), bytes on disk, peak memory."""

    run_dir: Path
    n_pieces: int
    n_shards: int
    resumed_shards: int
    seconds: float
    pieces_per_s: float
    bytes_on_disk: int
    peak_rss_bytes: int
    device: dict = field(default_factory=dict)


def load_run_pieces(cfg: RunConfig) -> tuple[list[KnowledgePiece], Path]:
    """Pieces named by ``cfg.data.pieces`` (first ``data.limit``).

    Raises:
        ConfigError: no pieces file configured.
    """
    if cfg.data.pieces is None:
        raise ConfigError("no pieces file: pass --data PIECES.jsonl (make one with `gradcouple download`).")
    pieces = read_pieces(cfg.data.pieces)
    if cfg.data.limit:
        pieces = pieces[: cfg.data.limit]
    return pieces, Path(cfg.data.pieces)


def encode_pieces(tokenizer, pieces: list[KnowledgePiece], cfg: RunConfig) -> list[EncodedPiece]:
    """Render each piece with the prompt template and tokenize it (errors name the piece id)."""
    out = []
    for p in pieces:
        prompt, answer = p.render(cfg.data.prompt_template)
        out.append(encode(tokenizer, prompt, answer, cfg.extract.max_length, where=f"piece {p.id}: "))
    return out


def _compatible(old: dict, new: dict) -> Optional[str]:
    for key in ("config_hash", "pieces_sha256", "store", "model"):
        if old.get(key) != new.get(key):
            return key
    return None


def extract(cfg: RunConfig, run_dir: str | Path, *, loaded: Optional[LoadedModel] = None,
            overwrite: bool = False, show_progress: bool = True) -> ExtractResult:
    """Extract per-piece gradients into ``run_dir/gradients``.

    Resumes a matching interrupted extraction; refuses one made under another configuration
    unless ``overwrite``.

    Raises:
        ConfigError: existing artifacts from another configuration (without ``overwrite``).
        DataError / ModelError: unreadable pieces, or a model that cannot be loaded.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    gdir = run_dir / "gradients"
    pieces, pieces_path = load_run_pieces(cfg)
    loaded = loaded or load_model(cfg.model.name, revision=cfg.model.revision, device=cfg.model.device, dtype=cfg.model.dtype)
    targets = select_targets(loaded.model, cfg.model.layers, cfg.model.module)
    shapes = [t.shape_info() for t in targets]
    header = {
        "format": "gradcouple-gradients", "version": 1, "package_version": __version__,
        "config_hash": cfg.extract_hash(), "pieces_file": str(pieces_path), "pieces_sha256": sha256_file(pieces_path),
        "model": loaded.identity(), "targets": shapes, "n_params": sum(s["n_params"] for s in shapes),
        "store": cfg.extract.store, "dtype": "float16", "compute_dtype": cfg.model.dtype,
        "proj_dim": cfg.extract.proj_dim if cfg.extract.store == "projected" else None,
        "proj_blocks": cfg.extract.proj_blocks if cfg.extract.store == "projected" else None,
        "seed": cfg.extract.seed, "prompt_template": cfg.data.prompt_template, "shard_size": cfg.extract.shard_size,
        "config": cfg.model_dump(mode="json", include={"data", "model", "extract"},
                                 exclude={"model": {"device"}, "extract": {"batch_size"}}),
    }
    mpath = gdir / "manifest.json"
    previous: dict = {}
    if mpath.is_file():
        previous = json.loads(mpath.read_text(encoding="utf-8"))
        bad = _compatible(previous, header)
        if bad and not overwrite:
            changed = config_diff(previous.get("config", {}), header["config"]) if bad == "config_hash" else []
            what = "; ".join(changed) if changed else f"a different {bad}"
            raise ConfigError(f"{mpath}: existing gradients were made with other settings ({what}); "
                              f"pass --overwrite to replace them or choose another --out.")
        if bad or overwrite:
            shutil.rmtree(gdir)
            previous = {}
    gdir.mkdir(parents=True, exist_ok=True)
    write_pieces(run_dir / "pieces.jsonl", pieces)

    encoded = encode_pieces(loaded.tokenizer, pieces, cfg)
    t_loop = time.perf_counter()
    order = sorted(range(len(pieces)), key=lambda i: (encoded[i].n_inputs, i))
    S = cfg.extract.shard_size
    shard_rows = [order[k:k + S] for k in range(0, len(order), S)]
    meta: list[Optional[dict]] = [None] * len(pieces)
    shards: list[dict] = []
    kept = {s["file"]: s for s in previous.get("shards", [])}
    for p_old in previous.get("pieces", []):
        if p_old is not None:
            meta[p_old["index"]] = p_old

    writer = ShardWriter(cfg.extract.store, shapes, cfg.extract.proj_dim, cfg.extract.seed, cfg.extract.proj_blocks)
    device = loaded.device
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    autocast = device.type == "cuda" and cfg.model.dtype != "float32"
    bs = cfg.extract.batch_size
    resumed = computed = 0
    columns = [TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TextColumn("pieces"), TimeRemainingColumn()]
    with Progress(*columns, console=progress_console(), disable=not show_progress, transient=False) as prog:
        task = prog.add_task("extract", total=len(pieces))
        for k, rows in enumerate(shard_rows):
            fname = f"shard-{k:05d}.pt"
            old = kept.get(fname)
            if old and old["rows"] == rows and (gdir / fname).is_file() and sha256_file(gdir / fname) == old["sha256"] \
                    and all(meta[r] is not None for r in rows):
                shards.append(old)
                resumed += 1
                prog.advance(task, len(rows))
                continue
            i = 0
            while i < len(rows):
                chunk = rows[i:i + bs]
                batch = collate([encoded[r] for r in chunk], pad_id).to(device)
                try:
                    with torch.autocast(device.type, dtype=getattr(torch, cfg.model.dtype), enabled=autocast):
                        result = batch_factors(loaded.model, targets, batch)
                except torch.cuda.OutOfMemoryError:
                    if bs == 1:
                        raise
                    bs = max(1, bs // 2)
                    torch.cuda.empty_cache()
                    continue
                for r, pf in zip(chunk, result):
                    writer.add(r, pf)
                    e = encoded[r]
                    pc = pieces[r]
                    meta[r] = {"index": r, "id": pc.id, "question_id": pc.question_id, "kind": pc.kind.value,
                               "hop": pc.hop, "prompt": e.prompt, "answer": e.answer,
                               "n_prompt_tokens": e.n_prompt_tokens, "n_answer_tokens": e.n_answer_tokens,
                               "n_inputs": e.n_inputs, "logprob": pf.logprob, "sq_norm": pf.sq_norm, "shard": k}
                prog.advance(task, len(chunk))
                i += len(chunk)
                computed += len(chunk)
            shards.append(writer.flush(gdir / fname))
            Manifest({**header, "complete": False, "batch_size": bs, "shards": shards, "pieces": meta}).save(mpath)
    seconds = time.perf_counter() - t0
    loop_s = time.perf_counter() - t_loop
    dev = device_info(device)
    timing = {"seconds": seconds, "extract_seconds": loop_s, "load_seconds": t_loop - t0,
              "pieces_per_s": computed / loop_s if loop_s > 0 else 0.0,
              "peak_rss_bytes": peak_rss_bytes(), **dev}
    Manifest({**header, "complete": True, "batch_size": bs, "shards": shards, "pieces": meta, "timing": timing}).save(mpath)
    cfg.save(run_dir / "config.json")
    return ExtractResult(run_dir, len(pieces), len(shards), resumed, seconds, timing["pieces_per_s"],
                         sum(s["bytes"] for s in shards), timing["peak_rss_bytes"], dev)


def open_store(run_dir: str | Path) -> GradientStore:
    """Open ``run_dir/gradients`` (verifying shard checksums)."""
    return GradientStore(Path(run_dir) / "gradients")
