"""Write a run directory's gradient store from in-memory factors, for tests of stores and Gram code
that need no model: the same ShardWriter and Manifest as ``extract``, with synthetic inputs."""

from __future__ import annotations

from pathlib import Path

from gradcouple.artifacts import Inputs, Manifest, ModelIdentity, PieceRecord, StoreSettings
from gradcouple.rundir import RunDir
from gradcouple.stores import GradientReader, ShardWriter


def write_store(root: Path, targets, factors, store="factors", shard_size=3, proj_dim=16, seed=0, order=None,
                proj_blocks=1, answers=None, owners=None) -> GradientReader:
    """Shards of ``factors`` (one PieceFactors per piece) in store order ``order``; returns a reader.

    ``targets`` are gradcouple Targets (or TargetShapes); piece i is ``p{i}`` with answer
    ``answers[i]`` and owners ``owners[i]`` (defaults: distinct answers, one question each).
    """
    run = RunDir(root)
    shapes = [t.shape_info() if hasattr(t, "shape_info") else t for t in targets]
    settings = StoreSettings(kind=store, proj_dim=proj_dim if store == "projected" else None,
                             proj_blocks=proj_blocks if store == "projected" else None, seed=seed)
    writer = ShardWriter(settings, shapes)
    order = list(order if order is not None else range(len(factors)))
    man = Manifest(inputs=Inputs(values={"pieces": "synthetic"}), pieces_file="synthetic",
                   model=ModelIdentity(name="synthetic", fingerprint="synthetic"), targets=shapes,
                   n_params=sum(s.n_params for s in shapes), store=settings, compute_dtype="float32", config={},
                   batch_size=1, complete=True)
    records = [None] * len(factors)
    for k in range(0, len(order), shard_size):
        rows = order[k:k + shard_size]
        for r in rows:
            writer.add(r, factors[r])
        man.shards.append(writer.flush(run.gradients.shard_path(k // shard_size)))
        for r in rows:
            f = factors[r]
            n_in = next(iter(f.x.values())).shape[0]
            records[r] = PieceRecord(index=r, id=f"p{r}", question_id=f"q{r}",
                                     owners=owners[r] if owners else [f"q{r}"], kind="single_hop", prompt=f"prompt {r}",
                                     answer=answers[r] if answers else f"answer {r}", n_prompt_tokens=n_in,
                                     n_answer_tokens=1, n_inputs=n_in, logprob=f.logprob, sq_norm=f.sq_norm,
                                     shard=k // shard_size)
    man.pieces = records
    run.gradients.save_manifest(man)
    return GradientReader(run)
