"""The ``ripple`` stage: real edits, their measured ripple effect, and how well coupling predicts it.

An edit moves theta by Delta theta to make piece i answer a*. To first order every piece j
moves by Delta log P_j ~= <g_j, Delta theta> (``first_order``, from the actual update and the
stored gradients). The coupling prediction uses only GradSim and norms: the part of the edit
along g_i changes piece j by <g_i, Delta theta> * cos(i, j) * |g_j| / |g_i| (``coupling``): only
that scalar depends on the edit, the ranking over j comes from coupling and norms.

Each edit (:mod:`gradcouple.edits`) is either gradient-step fine-tuning of the target layers
(Adam on -log P(a* | q_i)) or a ROME-style rank-one update of one target layer; the touched
weights are copied before and restored bit for bit after, as EasyEdit does.
Every piece's log-probability is measured before and after. Metrics, each defined once:

* ``spearman_*``: Spearman's rho between predicted and measured Delta log P over j != i.
* ``pearson_first_order``: Pearson's r of the first-order prediction.
* ``precision_at_k``: |top-k by |predicted coupling|  ∩  top-k by |measured||  / k.
* ``success``: after the edit, log P(a* | q_i) > log P(a_i | q_i).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from scipy import stats as sstats

from .config import RunConfig
from .couple import load_cosine
from .edits import finetune_edit, key_covariance, restore, rome_edit, snapshot
from .errors import ArtifactError, DataError
from .extract import encode_pieces
from .io import atomic_open, write_json
from .layers import select_targets
from .models import LoadedModel, load_model
from .pieces import KnowledgePiece, PieceKind, read_pieces
from .runinfo import progress_console, device_info
from .scoring import EncodedPiece, answer_logprob, collate, encode
from .store import GradientStore, KroneckerProjection


class NothingToEdit(DataError):
    """No piece has a counterfactual, and no two pieces of one kind have different answers."""


@dataclass
class RippleResult:
    out_dir: Path
    summary: dict


def measure_logprobs(model, encoded: list[EncodedPiece], batch_size: int = 16, pad_id: int = 0) -> torch.Tensor:
    """log P(answer | prompt) of every piece in nats, (N,) float64, batched by length, no grad."""
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].n_inputs)
    out = torch.empty(len(encoded), dtype=torch.float64)
    with torch.no_grad():
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            lp = answer_logprob(model, collate([encoded[i] for i in idx], pad_id).to(device))
            out[idx] = lp.double().cpu()
    return out


def first_order(store: GradientStore, deltas: dict[str, torch.Tensor], block: int = 256) -> torch.Tensor:
    """<g_j, Delta theta> for every piece j from the shards: (N,) float64 in pieces.jsonl order.

    factors: sum(Delta_j * (X_j Delta W^T)); dense: <G_j, Delta W>; projected: the unbiased
    estimate from both sketched with the same :class:`KroneckerProjection`.
    """
    out = torch.zeros(store.n, dtype=torch.float64)
    proj = {}
    if store.store == "projected":
        k, m, seed = store.manifest["proj_dim"], store.manifest.get("proj_blocks") or 1, store.manifest["seed"]
        for t in store.targets:
            kp = KroneckerProjection(t["name"], t["d_in"] + int(t["bias"]), t["d_out"], k, m, seed)
            proj[t["name"]] = kp.from_matrix(deltas[t["name"]].cpu())
    for i0 in range(0, store.n, block):
        i1 = min(store.n, i0 + block)
        for name in store.names:
            dw = deltas[name].float().cpu()
            if store.store == "factors":
                x, d, seg, sc = store.factors(i0, i1, name)
                per_tok = ((x.float() @ dw.t()) * d.float()).sum(1).double()
                out[i0:i1] += torch.zeros(i1 - i0, dtype=torch.float64).index_add(0, seg, per_tok) * sc.double()
            else:
                g, sc = store.matrices(i0, i1, name)
                ref = proj[name] if store.store == "projected" else dw
                out[i0:i1] += (g.float().flatten(1) @ ref.flatten()).double() * sc.double()
    res = torch.empty_like(out)
    res[torch.tensor(store.order)] = out
    return res


def choose_edits(pieces: list[KnowledgePiece], n: int, seed: int) -> list[tuple[int, str, str]]:
    """(piece index, new answer, source) for up to ``n`` edits.

    Single-hop and cloze pieces with a dataset counterfactual come first; the rest get a
    substitute: the answer of another piece of the same kind (seeded choice), which is how
    counterfactual-edit benchmarks without rewrites build them (CounterFact, MQuAKE).
    """
    rng = random.Random(seed)
    facts = [i for i, p in enumerate(pieces) if p.kind != PieceKind.multi_hop] or list(range(len(pieces)))
    with_cf = [i for i in facts if pieces[i].counterfactual]
    rng.shuffle(with_cf)
    chosen = [(i, pieces[i].counterfactual, "dataset") for i in with_cf[:n]]
    rest = [i for i in facts if not pieces[i].counterfactual]
    rng.shuffle(rest)
    for i in rest:
        if len(chosen) >= n:
            break
        p = pieces[i]
        own = {p.answer.strip().lower(), *(a.strip().lower() for a in p.aliases)}
        pool = sorted({q.answer for q in pieces if q.kind == p.kind and q.answer.strip().lower() not in own})
        if pool:
            chosen.append((i, rng.choice(pool), "substitute"))
    return chosen


def _spearman(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    if a.numel() < 3 or float(a.std()) == 0 or float(b.std()) == 0:
        return None
    return float(sstats.spearmanr(a.numpy(), b.numpy()).statistic)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    if a.numel() < 3 or float(a.std()) == 0 or float(b.std()) == 0:
        return None
    return float(sstats.pearsonr(a.numpy(), b.numpy()).statistic)


def _mean(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _spread(xs: list) -> dict:
    """n, mean, std, min, max of the non-missing values (the per-edit spread of a metric)."""
    v = torch.tensor([x for x in xs if x is not None], dtype=torch.float64)
    if v.numel() == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": int(v.numel()), "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def ripple(cfg: RunConfig, run_dir: str | Path, *, loaded: Optional[LoadedModel] = None, show_progress: bool = True) -> RippleResult:
    """Edit ``ripple.n_edits`` pieces one at a time and measure every piece's log-prob change.

    Writes ``ripple/edits.jsonl`` (one line per edit and other piece) and ``ripple/summary.json``.

    Raises:
        ArtifactError: gradients or coupling missing; or the model differs from the extraction's.
        DataError: no piece can be edited.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    store = GradientStore(run_dir / "gradients")
    ids, cos = load_cosine(run_dir)
    stats_path = run_dir / "coupling" / "stats.json"
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else {}
    for key in ("config_hash", "pieces_sha256"):
        if stats.get(key) != store.manifest.get(key):
            raise ArtifactError(f"{stats_path}: the coupling was computed from another extraction ({key} differs from "
                                f"{run_dir}/gradients/manifest.json); rerun `gradcouple couple --run {run_dir}`.")
    extracted = store.manifest.get("config") or {}
    if extracted:  # score exactly the strings the gradients were extracted for
        cfg = cfg.model_copy(deep=True)
        cfg.data.prompt_template = extracted["data"]["prompt_template"]
        cfg.extract.max_length = extracted["extract"]["max_length"]
    pieces = read_pieces(run_dir / "pieces.jsonl")
    if [p.id for p in pieces] != ids:
        raise ArtifactError(f"{run_dir}/coupling/cosine.pt does not match {run_dir}/pieces.jsonl; rerun `gradcouple couple --run {run_dir}`.")
    loaded = loaded or load_model(cfg.model.name, revision=cfg.model.revision, device=cfg.model.device, dtype=cfg.model.dtype)
    if loaded.identity() != store.manifest["model"]:
        raise ArtifactError(f"--model {cfg.model.name} is not the model the gradients in {run_dir} were extracted with "
                            f"({store.manifest['model']['name']}); use that model or rerun extract.")
    model, tok = loaded.model, loaded.tokenizer
    targets = select_targets(model, cfg.model.layers, cfg.model.module)
    if [t.name for t in targets] != store.names:
        raise ArtifactError(f"target layers {[t.name for t in targets]} differ from the extraction's {store.names}.")
    if cfg.ripple.method == "rome":
        if store.store != "factors":
            raise ArtifactError(f"--method rome needs the factors store (its inputs are ROME's keys); {run_dir} has "
                                f"'{store.store}': rerun extract with --store factors.")
        if not -len(targets) <= cfg.ripple.rome_layer < len(targets):
            raise ArtifactError(f"ripple.rome_layer={cfg.ripple.rome_layer}: there are {len(targets)} target layers.")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    encoded = encode_pieces(tok, pieces, cfg)
    edits = choose_edits(pieces, cfg.ripple.n_edits, cfg.ripple.seed)
    if not edits:
        raise NothingToEdit(f"{run_dir}/pieces.jsonl: no piece can be edited (need a counterfactual or two distinct answers of one kind).")
    norms = torch.tensor([sum(m["sq_norm"].values()) for m in store.manifest["pieces"]], dtype=torch.float64).sqrt()
    before = measure_logprobs(model, encoded, cfg.extract.batch_size, pad_id)
    questions = [set(p.owners or [p.question_id]) for p in pieces]
    out_dir = run_dir / "ripple"
    out_dir.mkdir(parents=True, exist_ok=True)
    records, pooled, covs = [], {"c": [], "f": [], "m": []}, {}
    with atomic_open(out_dir / "edits.jsonl", "w", encoding="utf-8") as fh, \
            Progress(TextColumn("[bold]ripple"), BarColumn(), MofNCompleteColumn(), TextColumn("edits"), console=progress_console(), disable=not show_progress) as prog:
        task = prog.add_task("ripple", total=len(edits))
        for e, (i, new_answer, source) in enumerate(edits):
            te = time.perf_counter()
            prompt, _ = pieces[i].render(cfg.data.prompt_template)
            new_ans = new_answer.strip() if prompt[-1:].isspace() else " " + new_answer.strip()
            enc_new = encode(tok, prompt, new_ans, cfg.extract.max_length, where=f"edit of {pieces[i].id}: ")
            new_before = float(measure_logprobs(model, [enc_new], 1, pad_id)[0])
            saved = snapshot(targets)
            if cfg.ripple.method == "rome":
                t_rome = targets[cfg.ripple.rome_layer]
                cov = covs.setdefault(t_rome.name, key_covariance(store, t_rome.name))
                deltas = rome_edit(model, targets, t_rome, enc_new, cov, cfg.ripple.rome_steps, cfg.ripple.rome_lr,
                                   cfg.ripple.rome_clamp, pad_id)
            else:
                deltas = finetune_edit(model, targets, enc_new, cfg.ripple.steps, cfg.ripple.lr, pad_id)
            after = measure_logprobs(model, encoded, cfg.extract.batch_size, pad_id)
            new_after = float(measure_logprobs(model, [enc_new], 1, pad_id)[0])
            restored = restore(targets, saved)
            if not restored:
                raise RuntimeError("target weights could not be restored bit for bit")
            measured = after - before
            pred_f = first_order(store, deltas)
            pred_c = float(pred_f[i]) * cos[i] * norms / norms[i].clamp_min(1e-300)
            others = torch.tensor([j for j in range(len(pieces)) if j != i], dtype=torch.long)
            m, pc, pf = measured[others], pred_c[others], pred_f[others]
            k = min(cfg.ripple.top_k, others.numel())
            top_pred = set(others[pc.abs().topk(k).indices].tolist())
            top_meas = set(others[m.abs().topk(k).indices].tolist())
            same = [j for j in others.tolist() if questions[i] & questions[j]]
            cross = [j for j in others.tolist() if not questions[i] & questions[j]]
            multi = [j for j in same if pieces[j].kind == PieceKind.multi_hop]
            rec = {"edit": e, "piece_id": pieces[i].id, "question_id": pieces[i].question_id, "kind": pieces[i].kind.value,
                   "prompt": prompt, "answer": pieces[i].answer, "new_answer": new_answer.strip(), "counterfactual_source": source,
                   "logprob_true_before": float(before[i]), "logprob_true_after": float(after[i]),
                   "logprob_new_before": new_before, "logprob_new_after": new_after, "success": new_after > float(after[i]),
                   "edit_norm": float(sum((d.double() ** 2).sum() for d in deltas.values()) ** 0.5),
                   "first_order_self": float(pred_f[i]), "spearman_coupling": _spearman(pc, m),
                   "spearman_first_order": _spearman(pf, m), "pearson_first_order": _pearson(pf, m),
                   "precision_at_k": len(top_pred & top_meas) / k if k else None, "k": k,
                   "mean_abs_measured_same_question": float(measured[same].abs().mean()) if same else None,
                   "mean_abs_measured_cross_question": float(measured[cross].abs().mean()) if cross else None,
                   "multi_hop_measured": [float(measured[j]) for j in multi],
                   "restored": restored, "seconds": time.perf_counter() - te}
            records.append(rec)
            pooled["c"].append(pc), pooled["f"].append(pf), pooled["m"].append(m)
            for j in others.tolist():
                fh.write(json.dumps({"edit": e, "edited_id": pieces[i].id, "piece_id": pieces[j].id,
                                     "same_question": bool(questions[i] & questions[j]), "cosine": float(cos[i, j]),
                                     "predicted_coupling": float(pred_c[j]), "predicted_first_order": float(pred_f[j]),
                                     "measured": float(measured[j])}) + "\n")
            prog.advance(task)
    pc, pf, pm = (torch.cat(pooled[x]) for x in ("c", "f", "m"))
    ok = [r for r in records if r["success"]]
    summary = {"method": cfg.ripple.method, "steps": cfg.ripple.steps, "lr": cfg.ripple.lr, "n_edits": len(records),
               "n_successful": len(ok), "seconds": time.perf_counter() - t0, "device": device_info(loaded.device),
               "spearman_coupling_mean": _mean([r["spearman_coupling"] for r in records]),
               "spearman_first_order_mean": _mean([r["spearman_first_order"] for r in records]),
               "spearman_coupling_mean_successful": _mean([r["spearman_coupling"] for r in ok]),
               "precision_at_k_mean": _mean([r["precision_at_k"] for r in records]),
               "per_edit": {m: _spread([r[m] for r in records]) for m in
                            ("spearman_coupling", "spearman_first_order", "pearson_first_order", "precision_at_k")},
               "pooled": {"spearman_coupling": _spearman(pc, pm), "spearman_first_order": _spearman(pf, pm),
                          "pearson_first_order": _pearson(pf, pm), "n_points": int(pm.numel())},
               "baseline_logprob_max_abs_diff_vs_manifest": float((before - torch.tensor(
                   [m["logprob"] for m in store.manifest["pieces"]], dtype=torch.float64)).abs().max()),
               "edits": records}
    write_json(out_dir / "summary.json", summary)
    return RippleResult(out_dir, summary)
