"""``gradcouple extract``: per-piece gradients into fp16 shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..ranks import is_main
from ..rundir import RunDir
from ..runinfo import human_bytes
from .options import (
    BatchSizeOpt,
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    LayersOpt,
    LimitOpt,
    MaxLengthOpt,
    ModelOpt,
    OverwriteOpt,
    StoreOpt,
    ThreadsOpt,
    console,
    layer_names,
    opt,
    print_notes,
    print_path,
    summary_table,
)

EPILOG = """Examples:

  gradcouple extract --data data/musique/pieces.jsonl --out runs/musique

  gradcouple extract --data pieces.jsonl --model gpt2 --layers all --store dense --out runs/gpt2
"""


def extract(
    data: DataOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory; gradients go to OUT/gradients.")] = Path("runs/default"),
    model: ModelOpt = None,
    layers: LayersOpt = None,
    module: Annotated[Optional[str], opt("model.module", "--module")] = None,
    store: StoreOpt = None,
    proj_dim: Annotated[Optional[int], opt("extract.proj_dim", "--proj-dim")] = None,
    proj_blocks: Annotated[Optional[int], opt("extract.proj_blocks", "--proj-blocks")] = None,
    batch_size: BatchSizeOpt = None,
    shard_size: Annotated[Optional[int], opt("extract.shard_size", "--shard-size")] = None,
    max_length: MaxLengthOpt = None,
    prompt_template: Annotated[Optional[str], opt("data.prompt_template", "--prompt-template")] = None,
    dtype: Annotated[Optional[str], opt("model.dtype", "--dtype")] = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    limit: LimitOpt = None,
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Compute every piece's gradient of log P(answer | prompt) on the target layers."""
    from .. import api  # deferred: torch and transformers (the stages), so `--help` stays fast

    res = api.extract(out, config=config, overwrite=overwrite, show_progress=True, data=data, model=model, layers=layers,
                      module=module, store=store, proj_dim=proj_dim, proj_blocks=proj_blocks, batch_size=batch_size,
                      shard_size=shard_size, max_length=max_length, prompt_template=prompt_template, dtype=dtype,
                      device=device, threads=threads, limit=limit)
    if not is_main():  # under torchrun rank 0 prints the summary
        return
    cfg = res.settings
    if res.resumed_shards == res.n_shards:
        console.print(f"nothing to do: all {res.n_shards} shards in {RunDir(out).gradients.dir} are complete and current.")
    console.print(summary_table("extract", [
        ("pieces", res.n_pieces), ("shards", f"{res.n_shards} ({res.resumed_shards} resumed)"),
        ("model", cfg.model.name), ("layers", f"{cfg.model.layers} -> {layer_names(res.targets)}"), ("store", cfg.extract.store),
        ("time", f"{res.seconds:.1f} s"), ("throughput", f"{res.pieces_per_s:.1f} pieces/s"),
        ("on disk", human_bytes(res.bytes_on_disk)), ("peak RSS", human_bytes(res.peak_rss_bytes)),
        ("device", f"{res.device.gpu or res.device.device}, {res.device.threads} threads" if res.device else "n/a")]))
    print_notes(res.device, res.truncated, res.n_pieces, cfg.extract.max_length)
    print_path(RunDir(out).gradients.manifest_path)
