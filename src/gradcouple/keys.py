"""Keys of a linear layer: its inputs at chosen token positions, and their second moment.

ROME (Meng et al. 2022) whitens an edit's key by C = E[k k^T] over the layer's inputs on
Wikipedia text. The HotpotQA and MuSiQue paragraphs bundled with the package are Wikipedia text,
enough for tens of thousands of tokens with no network.
"""

from __future__ import annotations

import hashlib

import torch

from .artifacts import CovarianceSource
from .datasets import wikipedia_paragraphs
from .io import atomic_torch_save
from .layers import Target
from .scoring import EncodedPiece, collate
from .stores import GradientReader


def cached_wikipedia_covariance(run, model_fingerprint: str, model, tokenizer, target: Target,
                                max_tokens: int = 50_000) -> tuple[torch.Tensor, CovarianceSource]:
    """:func:`wikipedia_covariance`, kept in the run directory (``RunDir.ripple.covariance_path``) so a rerun
    or a resumed ripple does not recompute it. The file is keyed by the model's fingerprint, the
    layer, the token budget and the bundled text's sha256; a file that does not load is recomputed."""
    text = hashlib.sha256("\n".join(wikipedia_paragraphs()).encode()).hexdigest()
    path = run.ripple.covariance_path([model_fingerprint, target.name, max_tokens, text, str(next(model.parameters()).dtype)])
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            return saved["covariance"], CovarianceSource.model_validate_json(saved["source"])
        except Exception:  # noqa: BLE001 (a damaged cache file is recomputed)
            pass
    cov, source = wikipedia_covariance(model, tokenizer, target, max_tokens)
    atomic_torch_save({"covariance": cov, "source": source.model_dump_json()}, path)
    return cov, source


def stored_key_covariance(reader: GradientReader, name: str, ridge: float = 1e-2, block_size: int = 256) -> torch.Tensor:
    """C = E[k k^T] over every stored input position of target ``name``: (d_in', d_in') float64.

    ROME estimates this second moment of the layer's keys on Wikipedia text; here it comes from
    the pieces' own stored inputs X. A ridge of ``ridge`` times the mean eigenvalue keeps it
    invertible.

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
    C /= max(1, count)
    return C + ridge * C.diagonal().mean() * torch.eye(d, dtype=torch.float64)


def _capture_inputs(model, target: Target, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    got = {}
    h = target.module.register_forward_hook(lambda m, a, o: got.__setitem__("x", a[0].detach()))
    try:
        with torch.no_grad():
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        h.remove()
    return got["x"]


def wikipedia_covariance(model, tokenizer, target: Target, max_tokens: int = 50_000, chunk: int = 128,
                         ridge: float = 1e-2) -> tuple[torch.Tensor, CovarianceSource]:
    """C = E[k k^T] of ``target``'s inputs (bias column appended) over up to ``max_tokens`` tokens of
    the bundled Wikipedia paragraphs, in chunks of ``chunk`` tokens: (d_in', d_in') float64, plus a
    ridge of ``ridge`` times the mean eigenvalue so it is invertible."""
    device = next(model.parameters()).device
    ids: list[int] = []
    for para in wikipedia_paragraphs():
        ids.extend(tokenizer(para, add_special_tokens=False)["input_ids"])
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    d = target.d_in_aug
    C = torch.zeros(d, d, dtype=torch.float64)
    n = 0
    for k in range(0, len(ids), chunk * 8):
        block = [ids[j:j + chunk] for j in range(k, min(len(ids), k + chunk * 8), chunk)]
        T = max(len(b) for b in block)
        x_ids = torch.full((len(block), T), 0, dtype=torch.long)
        mask = torch.zeros((len(block), T), dtype=torch.long)
        for b, seq in enumerate(block):
            x_ids[b, :len(seq)], mask[b, :len(seq)] = torch.tensor(seq), 1
        x = _capture_inputs(model, target, x_ids.to(device), mask.to(device))[mask.bool().to(device)].double().cpu()
        if target.has_bias:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        C += x.t() @ x
        n += x.shape[0]
    C /= max(1, n)
    C += ridge * C.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    return C, CovarianceSource(text="bundled HotpotQA and MuSiQue Wikipedia paragraphs", n_tokens=n, layer=target.name)


def keys_at(model, target: Target, encoded: list[EncodedPiece], positions: list[int], pad_id: int = 0,
            batch_size: int = 16) -> torch.Tensor:
    """``target``'s input of each piece at its position (bias column appended): (N, d_in') float64."""
    device = next(model.parameters()).device
    out = torch.zeros(len(encoded), target.d_in_aug, dtype=torch.float64)
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].n_inputs)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        batch = collate([encoded[i] for i in idx], pad_id)
        x = _capture_inputs(model, target, batch.input_ids.to(device), batch.attention_mask.to(device))
        for b, i in enumerate(idx):
            out[i, :target.d_in] = x[b, positions[i]].double().cpu()
    if target.has_bias:
        out[:, -1] = 1.0
    return out
