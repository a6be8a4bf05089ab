"""Keys of a linear layer: its inputs at chosen token positions, and their second moment.

ROME (Meng et al. 2022) whitens an edit's key by C = E[k k^T] over the layer's inputs on
Wikipedia text. The HotpotQA and MuSiQue paragraphs bundled with the package are Wikipedia text,
enough for tens of thousands of tokens with no network.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Optional

import torch

from .artifacts import CovarianceSource
from .datasets import wikipedia_paragraphs
from .io import atomic_torch_save, digest, tensor_sha256
from .layers import Target, select_targets
from .models import cache_dir, load_model
from .scoring import EncodedPiece, collate
from .stores import GradientReader

log = logging.getLogger(__name__)


def covariance_cache_path(key: list) -> Path:
    """The user-cache file of the key covariance computed under ``key`` (model fingerprint, layer, token
    budget, text sha256, dtype, sampled weights): ``cache_dir()/covariance/<fingerprint, 16 characters>-<digest>.pt``."""
    return cache_dir() / "covariance" / covariance_cache_path_name(key)


def covariance_cache_path_name(key: list) -> str:
    """The file name :func:`covariance_cache_path` gives ``key``: the fingerprint's first 16 characters
    (others than letters and digits as '-') and 20 hex digits of the key's digest."""
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', str(key[1]))[:16]}-{digest(key)[:20]}.pt"


def _load_cached(path: Path, key: list) -> Optional[tuple[torch.Tensor, CovarianceSource]]:
    """A cached covariance when ``path`` holds one made under ``key`` whose bytes match its sha256;
    None when absent; a damaged or foreign file is logged as a warning and treated as absent."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        cov = saved["covariance"]
        if saved["key"] != digest(key) or tensor_sha256(cov) != saved["sha256"]:
            raise ValueError("its contents do not match its key and checksum")
        return cov, CovarianceSource.model_validate_json(saved["source"]).model_copy(update={"file": str(path)})
    except Exception as e:  # noqa: BLE001 (any damage means: compute it again)
        log.warning(f"key covariance cache {path} is damaged ({e}); computing it again.")
        return None


def sampled_weights_digest(model, stride: int = 4099) -> str:
    """sha256 (16 hex) of every ``stride``-th element of every parameter: a cheap check, beside the model's
    fingerprint, that a cached covariance was computed from these weights (a model whose fingerprint is its
    name, such as a random test model, or one changed in memory, gets other files)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().reshape(-1)[::stride].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_wikipedia_covariances(model_fingerprint: str, model, tokenizer, targets: list[Target],
                                 max_tokens: int = 50_000) -> dict[str, tuple[torch.Tensor, CovarianceSource]]:
    """:func:`wikipedia_covariances` of ``targets``, computed once per model and kept in the user's cache
    (:func:`covariance_cache_path`), as ROME keeps its layer statistics per model; the missing ones are
    computed together, in one pass over the text that stops at the highest of them. A file is keyed by
    the model's fingerprint, the layer, the token budget, the bundled text's sha256, the dtype and a sample
    of the weights (:func:`sampled_weights_digest`), and verified by the sha256 of its tensor: a damaged
    file is recomputed with a warning. Each source names the file it was read from
    (``CovarianceSource.file``), which the run records."""
    text = hashlib.sha256("\n".join(wikipedia_paragraphs()).encode()).hexdigest()
    dtype = str(next(model.parameters()).dtype)
    weights = sampled_weights_digest(model)
    keys = {t.name: ["raw second moment", model_fingerprint, t.name, max_tokens, text, dtype, weights] for t in targets}
    out: dict[str, tuple[torch.Tensor, CovarianceSource]] = {}
    for t in targets:
        got = _load_cached(covariance_cache_path(keys[t.name]), keys[t.name])
        if got is not None:
            out[t.name] = got
    missing = [t for t in targets if t.name not in out]
    if missing:
        for name, (cov, source) in wikipedia_covariances(model, tokenizer, missing, max_tokens).items():
            path = covariance_cache_path(keys[name])
            source = source.model_copy(update={"file": str(path), "sha256": tensor_sha256(cov)})
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"covariance": cov, "source": source.model_dump_json(), "key": digest(keys[name]),
                               "sha256": source.sha256}, path)
            out[name] = cov, source
    return out


def ridged(C: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """C + ridge * mean eigenvalue * I: a second moment made safely invertible for a predictor that
    whitens by it ((d, d) float64 in and out). The edit methods use C as their reference code does, raw."""
    return C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)


def stored_key_covariance(reader: GradientReader, name: str, block_size: int = 256) -> torch.Tensor:
    """C = E[k k^T] over every stored input position of target ``name``: (d_in', d_in') float64.

    ROME estimates this second moment of the layer's keys on Wikipedia text; here it comes from
    the pieces' own stored inputs X.

    Raises:
        ArtifactError: the store keeps no inputs (dense and projected stores).
    """
    d = next(t.d_in_aug for t in reader.manifest.targets if t.name == name)
    C = torch.zeros(d, d, dtype=torch.float64)
    count = 0
    for i0 in range(0, reader.n, block_size):
        xs = reader.kind.inputs(reader, i0, min(reader.n, i0 + block_size), name)
        C += xs.t() @ xs
        count += xs.shape[0]
    return C / max(1, count)


class _Enough(Exception):
    """Raised by the hook of the highest target: the blocks above it are not needed."""


def _capture_inputs(model, targets: list[Target], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each target's input over a batch, from one no-grad forward that stops after the highest target."""
    got: dict[str, torch.Tensor] = {}
    last = max(targets, key=lambda t: -1 if t.block is None else t.block) if all(t.block is not None for t in targets) else None

    def hook(t):
        def fn(m, a):
            got[t.name] = a[0].detach()
            if t is last:
                raise _Enough
        return fn

    handles = [t.module.register_forward_pre_hook(hook(t)) for t in targets]
    try:
        with torch.no_grad():
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def wikipedia_covariances(model, tokenizer, targets: list[Target], max_tokens: int = 50_000,
                          chunk: int = 128) -> dict[str, tuple[torch.Tensor, CovarianceSource]]:
    """C = E[k k^T] of each target's inputs (bias column appended) over up to ``max_tokens`` tokens
    of the bundled Wikipedia paragraphs, in chunks of ``chunk`` tokens, all targets in one pass
    that stops at the highest: {name: ((d_in', d_in') float64, source)}, the uncentred second
    moment ROME's ``layer_stats`` collects as ``mom2`` (no ridge: see :func:`ridged`)."""
    device = next(model.parameters()).device
    ids: list[int] = []
    for para in wikipedia_paragraphs():
        ids.extend(tokenizer(para, add_special_tokens=False)["input_ids"])
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    C = {t.name: torch.zeros(t.d_in_aug, t.d_in_aug, dtype=torch.float64) for t in targets}
    n = 0
    for k in range(0, len(ids), chunk * 8):
        block = [ids[j:j + chunk] for j in range(k, min(len(ids), k + chunk * 8), chunk)]
        T = max(len(b) for b in block)
        x_ids = torch.full((len(block), T), 0, dtype=torch.long)
        mask = torch.zeros((len(block), T), dtype=torch.long)
        for b, seq in enumerate(block):
            x_ids[b, :len(seq)], mask[b, :len(seq)] = torch.tensor(seq), 1
        got = _capture_inputs(model, targets, x_ids.to(device), mask.to(device))
        keep = mask.bool().to(device)
        for t in targets:
            x = got[t.name][keep].double().cpu()
            if t.has_bias:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
            C[t.name] += x.t() @ x
        n += int(keep.sum())
    return {t.name: (C[t.name] / max(1, n), CovarianceSource(text="bundled HotpotQA and MuSiQue Wikipedia paragraphs",
                                                            n_tokens=n, layer=t.name)) for t in targets}


def keys_at(model, target: Target, encoded: list[EncodedPiece], positions: list[int], pad_id: int = 0,
            batch_size: int = 16) -> torch.Tensor:
    """``target``'s input of each piece at its position (bias column appended): (N, d_in') float64."""
    device = next(model.parameters()).device
    out = torch.zeros(len(encoded), target.d_in_aug, dtype=torch.float64)
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].n_inputs)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        batch = collate([encoded[i] for i in idx], pad_id)
        x = _capture_inputs(model, [target], batch.input_ids.to(device), batch.attention_mask.to(device))[target.name]
        for b, i in enumerate(idx):
            out[i, :target.d_in] = x[b, positions[i]].double().cpu()
    if target.has_bias:
        out[:, -1] = 1.0
    return out


def precompute_covariances(model: str, layers: str = "last4", max_tokens: int = 50_000,
                           every_layer: bool = False) -> list[CovarianceSource]:
    """Compute the Wikipedia key covariance of ``model``'s lowest ``layers`` block (every one of them with
    ``every_layer``) into the user cache now, so the first ripple that needs it does not wait; ``make
    install`` runs it for the demo's model (``precompute_covariances("smollm2-135m")``, the covariance ft's
    key predictors read at block 26). Returns each covariance's source, ``file`` naming the cache file.

    Raises:
        ModelError / ConfigError: as :func:`gradcouple.models.load_model` and :func:`gradcouple.layers.select_targets`.
    """
    loaded = load_model(model, device="cpu")
    targets = select_targets(loaded.model, layers)
    out = cached_wikipedia_covariances(loaded.identity().fingerprint, loaded.model, loaded.tokenizer,
                                       targets if every_layer else targets[:1], max_tokens)
    return [source for _, source in out.values()]
