"""``gradcouple extract``: per-piece gradients into fp16 shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ConfigError
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
    ModelOpt,
    OverwriteOpt,
    ThreadsOpt,
    build_config,
    console,
    layer_names,
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
    module: Annotated[Optional[str], typer.Option(help="Module inside each block, e.g. mlp.down_proj.")] = None,
    store: Annotated[Optional[str], typer.Option(help="factors (exact, default), dense (exact) or projected.")] = None,
    proj_dim: Annotated[Optional[int], typer.Option("--proj-dim", help="k_in = k_out of each Kronecker sketch (store=projected).")] = None,
    proj_blocks: Annotated[Optional[int], typer.Option("--proj-blocks", help="Independent sketches per target (store=projected).")] = None,
    batch_size: BatchSizeOpt = None,
    shard_size: Annotated[Optional[int], typer.Option("--shard-size", help="Pieces per shard file, the unit of resume (default 64).")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Token limit of prompt+answer (default 256).")] = None,
    prompt_template: Annotated[Optional[str], typer.Option("--prompt-template", help="How question pieces are asked; must contain "
                                                           "{question} (default: 'Question: {question}', a newline, 'Answer:').")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32 (default), bfloat16 or float16: the weights' dtype; checked on the device first, recorded in the manifest.")] = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    limit: LimitOpt = None,
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Compute every piece's gradient of log P(answer | prompt) on the target layers."""
    from ..stages import extract as stage  # deferred: torch and transformers (the stage), so `--help` stays fast

    cfg = build_config(config, out, {
        "data.pieces": data, "data.limit": limit, "model.name": model, "model.layers": layers, "model.module": module,
        "model.device": device, "model.dtype": dtype, "model.threads": threads, "extract.store": store, "extract.proj_dim": proj_dim,
        "extract.proj_blocks": proj_blocks, "extract.batch_size": batch_size, "extract.shard_size": shard_size,
        "extract.max_length": max_length, "data.prompt_template": prompt_template})
    for flag, value in (("--proj-dim", proj_dim), ("--proj-blocks", proj_blocks)):
        if value is not None and cfg.extract.store != "projected":

            raise ConfigError(f"{flag} {value}: sizes the sketches of --store projected, and the store here is "
                              f"{cfg.extract.store}; drop {flag} or pass --store projected.")
    res = stage.extract(cfg, out, overwrite=overwrite)
    if not is_main():  # under torchrun rank 0 prints the summary
        return
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
