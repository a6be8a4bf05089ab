"""Write a gradient store from in-memory factors, for tests of the store and the Gram code."""

from __future__ import annotations

from pathlib import Path

from gradcouple.store import Manifest, ShardWriter


def write_store(directory: Path, targets, factors, store="factors", shard_size=3, proj_dim=16, seed=0, order=None, proj_blocks=1):
    shapes = [t.shape_info() for t in targets]
    writer = ShardWriter(store, shapes, proj_dim, seed, proj_blocks)
    order = list(order if order is not None else range(len(factors)))
    shards = []
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(order), shard_size):
        for r in order[k:k + shard_size]:
            writer.add(r, factors[r])
        shards.append(writer.flush(directory / f"shard-{k // shard_size:05d}.pt"))
    pieces = [{"index": i, "id": f"p{i}", "n_inputs": next(iter(f.x.values())).shape[0], "sq_norm": f.sq_norm,
               "logprob": f.logprob} for i, f in enumerate(factors)]
    Manifest({"complete": True, "store": store, "targets": shapes, "shards": shards, "pieces": pieces,
              "proj_dim": proj_dim, "proj_blocks": proj_blocks, "seed": seed}).save(directory / "manifest.json")
