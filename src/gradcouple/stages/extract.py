"""The ``extract`` stage: per-piece gradients of the answer log-prob into fp16 shards.

Pieces are tokenized, sorted by length (less padding), split into shards of
``extract.shard_size`` and each shard into batches of ``extract.batch_size``. One forward and
one backward per batch yields every piece's exact factors (:mod:`gradcouple.gradients`), which
the store kind encodes. After each shard the manifest is rewritten atomically, so an
interrupted extraction resumes from its last complete shard. Under ``torchrun`` the ranks share
the shards (:mod:`gradcouple.stages.resume`) and rank 0 writes the one manifest.
"""

from __future__ import annotations

import contextlib
import errno
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from pydantic import BaseModel

from ..artifacts import DeviceInfo, ExtractTiming, Inputs, Manifest, PieceRecord, ShardEntry, StoreSettings
from ..config import RunConfig
from ..errors import ConfigError, ResourceError
from ..gradients import batch_factors
from ..io import sha256_file
from ..layers import Target, select_targets
from ..models import LoadedModel, load_model, model_fingerprint
from ..pieces import KnowledgePiece, read_pieces
from ..progress import progress
from ..ranks import rank_device
from ..rundir import RunDir, locked
from ..runinfo import device_info, human_bytes, peak_rss_bytes, use_threads
from ..scoring import EncodedPiece, collate, encode_pieces
from ..stores import ShardWriter
from .resume import Earlier, Extraction, _changes, _previous, journal_changes


class ExtractResult(BaseModel):
    """What ``extract`` did: counts, seconds, throughput (pieces/s), bytes on disk, peak memory (bytes).

    ``reused`` is True when a current extraction was found and nothing was computed; ``changed``
    lists what made a previous extraction stale when it was replaced. ``targets`` are the layers
    actually selected; ``truncated`` is (pieces cut to max_length, most tokens cut, tokens cut in all).
    """

    run_dir: Path
    n_pieces: int
    n_shards: int
    resumed_shards: int
    reused: bool = False
    changed: list[str] = []
    seconds: float
    pieces_per_s: float
    bytes_on_disk: int
    peak_rss_bytes: int
    device: Optional[DeviceInfo] = None
    targets: list[str] = []
    truncated: tuple[int, int, int] = (0, 0, 0)
    settings: Optional[RunConfig] = None  #: the data, model and extract settings the gradients were extracted with

    @classmethod
    def from_manifest(cls, run: RunDir, man: Manifest, *, resumed: int, seconds: float, reused: bool = False,
                      changed: list[str] | None = None) -> "ExtractResult":
        t = man.timing
        return cls(run_dir=run.root, n_pieces=len(man.pieces), n_shards=len(man.shards), resumed_shards=resumed,
                   reused=reused, changed=changed or [], seconds=seconds, pieces_per_s=t.pieces_per_s if t else 0.0,
                   bytes_on_disk=sum(s.bytes for s in man.shards), peak_rss_bytes=peak_rss_bytes(),
                   targets=man.names, truncated=man.truncation(), device=t.device if t else None,
                   settings=man.settings())


def load_data_pieces(cfg: RunConfig) -> list[KnowledgePiece]:
    """The first ``data.limit`` pieces of ``data.pieces``.

    Raises:
        ConfigError: no pieces file configured.
        DataError: unreadable pieces file.
    """
    if cfg.data.pieces is None:
        raise ConfigError("no pieces file: pass --data PIECES.jsonl (make one with `gradcouple download`).")
    pieces = read_pieces(cfg.data.pieces)
    return pieces[: cfg.data.limit] if cfg.data.limit else pieces


def extraction_inputs(cfg: RunConfig) -> Inputs:
    """The fingerprints an extraction under ``cfg`` is made from: pieces file, settings, model weights.

    Computed without loading the model (:func:`~gradcouple.models.model_fingerprint`).
    """
    if cfg.data.pieces is None:
        raise ConfigError("no pieces file: pass --data PIECES.jsonl (make one with `gradcouple download`).")
    if not Path(cfg.data.pieces).is_file():
        load_data_pieces(cfg)  # raises the DataError that names the file
    return Inputs(values={"pieces": sha256_file(cfg.data.pieces), "config": cfg.extract_hash(),
                          "model": model_fingerprint(cfg.model.name, cfg.model.revision)})


def extraction_changes(run: RunDir, cfg: RunConfig) -> Optional[list[str]]:
    """What differs between ``run``'s extraction and one made under ``cfg`` now: [] when it is
    complete and current; None when there is none, or an interrupted one to resume."""
    man, unusable = _previous(run)
    if unusable:
        return unusable
    if man is None:  # an interrupted torchrun extraction has only its ranks' journals
        return journal_changes(run, extraction_inputs(cfg), _extracted_config(cfg)) if run.gradients.rank_manifest_paths() else None
    changed = _changes(man, extraction_inputs(cfg), _extracted_config(cfg))
    return None if not man.complete and not changed else changed


def _extracted_config(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json", include={"data", "model", "extract"},
                          exclude={"data": {"pieces"}, "model": {"device"}, "extract": {"batch_size"}})


def plan_shards(encoded: list[EncodedPiece], shard_size: int) -> list[list[int]]:
    """Piece indices per shard: sorted by input length (then index), ``shard_size`` per shard."""
    order = sorted(range(len(encoded)), key=lambda i: (encoded[i].n_inputs, i))
    return [order[k:k + shard_size] for k in range(0, len(order), shard_size)]


def _new_manifest(cfg: RunConfig, loaded: LoadedModel, targets: list[Target], inputs: Inputs) -> Manifest:
    shapes = [t.shape_info() for t in targets]
    projected = cfg.extract.store == "projected"
    return Manifest(inputs=inputs, pieces_file=str(Path(cfg.data.pieces).resolve()), model=loaded.identity(), targets=shapes,
                    n_params=sum(s.n_params for s in shapes),
                    compute_dtype=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
                    store=StoreSettings(kind=cfg.extract.store, seed=cfg.extract.seed,
                                        proj_dim=cfg.extract.proj_dim if projected else None,
                                        proj_blocks=cfg.extract.proj_blocks if projected else None),
                    config=_extracted_config(cfg), batch_size=cfg.extract.batch_size)


def _kept_shard(run: RunDir, previous: Optional[Earlier], k: int, rows: list[int]) -> Optional[ShardEntry]:
    """Shard ``k`` of an earlier run (manifest.json or a torchrun rank's journal) when it holds ``rows``
    and its file is intact; its records are then in ``previous.pieces``."""
    return None if previous is None else previous.kept(run, k, rows)


def _flush(run: RunDir, man: Manifest, writer: ShardWriter, k: int, taken: tuple[list[int], dict]) -> ShardEntry:
    """Write shard ``k`` (the pieces ``taken`` from the writer); a full disk becomes one line saying
    how much more the extraction needs. Runs on the shard-writing thread.

    Raises:
        ResourceError: the disk (or quota) is full (exit 6); the partial shard is gone, the
            complete shards and the manifest listing them are kept, so a rerun resumes.
        OSError: any other write error.
    """
    path = run.gradients.shard_path(k)
    try:
        return writer.write(path, taken)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        done_rows, done_bytes = sum(len(s.rows) for s in man.shards), sum(s.bytes for s in man.shards)
        remaining = len(man.pieces) - done_rows
        # pieces run in order of length, so the shard that failed has the largest pieces so far
        per_piece = max(done_bytes / done_rows if done_rows else 0.0, writer.pending_bytes(taken) / max(1, len(taken[0])))
        what = "disk quota exceeded" if e.errno == errno.EDQUOT else "disk full"
        kept = f"{len(man.shards)} complete shard{'s are' if len(man.shards) != 1 else ' is'}"
        raise ResourceError(
            f"{run.gradients.dir}: {what} while writing {path.name}; the extraction needs about "
            f"{human_bytes(remaining * per_piece)} more ({remaining} pieces × {human_bytes(per_piece)}); free space, "
            f"then rerun the same command to resume ({kept} kept), or use --out on another disk.") from None


def extract_shard(loaded: LoadedModel, targets: list[Target], encoded: list[EncodedPiece], rows: list[int],
                  batch_size: int, dtype: str, writer: ShardWriter, advance) -> tuple[dict[int, tuple[float, dict]], int]:
    """Run the pieces ``rows`` through the model in batches and add their factors to ``writer``.

    Returns ({row: (log-prob in nats, squared norms per target)}, the batch size in use), which is
    halved on CUDA out-of-memory down to 1.
    """
    device, out, i = loaded.device, {}, 0
    autocast = device.type == "cuda" and dtype != "float32"
    if autocast:  # bf16/fp16 products accumulate in fp32 (cuBLAS may otherwise reduce split-K partial sums in 16 bits)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    while i < len(rows):
        chunk = rows[i:i + batch_size]
        batch = collate([encoded[r] for r in chunk], loaded.pad_id).to(device)
        try:
            with torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=autocast):
                result = batch_factors(loaded.model, targets, batch)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            torch.cuda.empty_cache()
            continue
        for r, pf in zip(chunk, result):
            writer.add(r, pf)
            out[r] = (pf.logprob, pf.sq_norm)
        advance(len(chunk))
        i += len(chunk)
    return out, batch_size


def _record(p: KnowledgePiece, e: EncodedPiece, index: int, shard: int, logprob: float, sq_norm: dict) -> PieceRecord:
    return PieceRecord(index=index, id=p.id, question_id=p.question_id, owners=sorted(p.question_ids), kind=p.kind.value,
                       hop=p.hop, prompt=e.prompt, answer=e.answer, n_prompt_tokens=e.n_prompt_tokens,
                       n_answer_tokens=e.n_answer_tokens, n_inputs=e.n_inputs, logprob=logprob, sq_norm=sq_norm,
                       shard=shard, truncated_tokens=e.truncated_tokens)


@locked("extract")
def extract(cfg: RunConfig, run_dir: str | Path, *, loaded: Optional[LoadedModel] = None,
            overwrite: bool = False, show_progress: bool = True) -> ExtractResult:
    """Extract per-piece gradients into ``run_dir/gradients``.

    Resumes an interrupted extraction made from the same inputs; refuses one made from other
    inputs unless ``overwrite``.

    Raises:
        ConfigError: existing artifacts from other inputs (without ``overwrite``).
        DataError / ModelError: unreadable pieces, or a model that cannot be loaded.
        ResourceError: the disk fills while a shard is written (the message says how much more is needed).
        OSError: the run directory cannot be written (EACCES, EROFS; the CLI reports it naming the directory).
    """
    t0, run = time.perf_counter(), RunDir(run_dir)
    use_threads(cfg.model.threads)
    pieces, inputs = load_data_pieces(cfg), extraction_inputs(cfg)
    loaded = loaded or load_model(cfg.model.name, revision=cfg.model.revision, device=rank_device(cfg.model.device),
                                  dtype=cfg.model.dtype)
    inputs.values["model"] = loaded.identity().fingerprint  # a Hub id resolves to its commit once downloaded
    targets = select_targets(loaded.model, cfg.model.layers, cfg.model.module)
    man = _new_manifest(cfg, loaded, targets, inputs)
    work = Extraction(run, man, overwrite, pieces)  # what earlier runs left; writes pieces.jsonl (rank 0)
    encoded = encode_pieces(loaded.tokenizer, pieces, cfg.data.prompt_template, cfg.extract.max_length)
    man.pieces = [None] * len(pieces)
    writer, bs, resumed, computed = ShardWriter(man.store, man.targets), cfg.extract.batch_size, 0, 0
    shards, previous = work.share(plan_shards(encoded, cfg.extract.shard_size), encoded), work.previous  # this rank's
    t_loop = time.perf_counter()
    # shard k is written on a background thread while shard k+1 is computed (at most one in flight,
    # so memory stays bounded and the model never waits on the disk); the manifest lists a shard
    # only once its file is complete
    pending: list[tuple[int, dict, Future]] = []

    def settle() -> None:
        nonlocal computed
        while pending:
            k, results, future = pending.pop()
            man.shards.append(future.result())
            for r, (lp, sq) in results.items():
                man.pieces[r] = _record(pieces[r], encoded[r], r, k, lp, sq)
            computed += len(results)
            work.save(man)

    with ThreadPoolExecutor(1, thread_name_prefix="gradcouple-shards") as disk, \
            progress("extract", sum(map(len, shards.values())), "pieces", show_progress and work.main) as advance:
        try:
            for k, rows in shards.items():
                kept = _kept_shard(run, previous, k, rows)
                if kept is not None:
                    settle()
                    man.shards.append(kept)
                    for r in rows:
                        man.pieces[r] = previous.pieces[r]
                    resumed += 1
                    advance(len(rows))
                    continue
                results, bs = extract_shard(loaded, targets, encoded, rows, bs, cfg.model.dtype, writer, advance)
                man.batch_size = bs
                taken = writer.take()
                settle()
                pending.append((k, results, disk.submit(_flush, run, man, writer, k, taken)))
            settle()
        except BaseException:
            with contextlib.suppress(Exception):
                settle()  # a shard written before the interrupt or fault is kept: the rerun need not redo it
            raise
    loop_s = time.perf_counter() - t_loop
    man, computed, loop_s = work.merge(man, computed, loop_s)  # under torchrun: every rank's shards, on rank 0
    man.complete = True
    man.timing = ExtractTiming(seconds=time.perf_counter() - t0, load_seconds=t_loop - t0, extract_seconds=loop_s,
                               pieces_per_s=computed / loop_s if loop_s > 0 else 0.0, peak_rss_bytes=peak_rss_bytes(),
                               device=device_info(loaded.device))
    man = work.finish(man, cfg)
    return ExtractResult.from_manifest(run, man, resumed=resumed + work.resumed, seconds=man.timing.seconds)


def ensure_extraction(cfg: RunConfig, run_dir: str | Path, *, loaded: Optional[LoadedModel] = None,
                      replace_stale: bool = False, show_progress: bool = True) -> ExtractResult:
    """Extract if needed: reuse ``run_dir``'s extraction when it is current under ``cfg`` (checked
    without loading the model), otherwise extract.

    A stale extraction (pieces edited, a setting changed, other model weights) is replaced when
    ``replace_stale`` (the result's ``changed`` says why) and refused otherwise.

    Raises:
        ConfigError: a stale extraction without ``replace_stale``.
    """
    t0, run = time.perf_counter(), RunDir(run_dir)
    changed = extraction_changes(run, cfg)
    if changed and not replace_stale:  # refused before the model loads; nothing is deleted
        raise ConfigError(f"{run.gradients.manifest_path}: the gradients in {run.root} were made from other inputs "
                          f"({'; '.join(changed)}); pass --overwrite to replace them, or give another run directory.")
    if changed == []:
        man = run.gradients.load_manifest()
        run.save_config(cfg)
        return ExtractResult.from_manifest(run, man, resumed=len(man.shards), seconds=time.perf_counter() - t0, reused=True)
    res = extract(cfg, run_dir, loaded=loaded, overwrite=replace_stale and bool(changed), show_progress=show_progress)
    return res.model_copy(update={"changed": changed or []})
