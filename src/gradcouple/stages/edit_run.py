"""Everything ripple's edits need, loaded and checked once: the run's artifacts, the model and its
target layers (the extraction's), the edit method, and the key covariance of a layer."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..artifacts import CouplingStats, CovarianceSource, Inputs, Manifest
from ..config import RunConfig
from ..edits import EditContext, EditMethod, method_class
from ..errors import ArtifactError
from ..keys import cached_wikipedia_covariances, stored_key_covariance
from ..layers import Target, select_targets
from ..models import LoadedModel, load_model
from ..pieces import KnowledgePiece
from ..rundir import RippleResults, RunDir
from ..scoring import EncodedPiece, encode_pieces
from ..stores import GradientReader
from ..suffix import SuffixExecution, suffix_execution


@dataclass
class RippleRun:
    """A run ready for edits. ``before`` holds the unedited log-probs (nats) once measured."""

    run: RunDir
    cfg: RunConfig
    manifest: Manifest
    stats: Optional[CouplingStats]
    reader: GradientReader
    pieces: list[KnowledgePiece]
    cos: Optional[torch.Tensor]
    loaded: LoadedModel
    targets: list[Target]
    encoded: list[EncodedPiece]
    norms: torch.Tensor
    method: EditMethod
    before: Optional[torch.Tensor] = None
    _covariances: dict[str, tuple[torch.Tensor, CovarianceSource]] = field(default_factory=dict)
    _context: Optional[EditContext] = None
    _suffix: dict[int, SuffixExecution] = field(default_factory=dict)

    @property
    def template(self) -> str:
        return self.manifest.settings().data.prompt_template

    @property
    def max_length(self) -> int:
        return self.manifest.settings().extract.max_length

    def covariance(self, target: Target) -> tuple[torch.Tensor, CovarianceSource]:
        """C = E[k kᵀ] of ``target``'s inputs ((d_in', d_in') float64, raw) and where it came from:
        ``ripple.covariance`` 'wikipedia' (bundled Wikipedia text, kept in the user's cache per model) or
        'pieces' (the run's stored inputs). Computed once per target.

        Raises:
            ArtifactError: 'pieces' on a store that keeps no inputs, or for a layer it did not extract.
        """
        self.prefetch([target])
        return self._covariances[target.name]

    def prefetch(self, targets: list[Target]) -> None:
        """Compute the covariances of ``targets`` not yet at hand (the Wikipedia ones in one pass)."""
        missing = [t for t in targets if t.name not in self._covariances]
        if not missing:
            return
        rc = self.cfg.ripple
        if rc.covariance == "pieces":
            if not self.reader.kind.keeps_inputs:
                raise ArtifactError(f"ripple.covariance 'pieces' reads the layer inputs that only the factors store "
                                    f"keeps; {self.run.root} has '{self.reader.kind.name}': rerun extract with "
                                    f"--store factors, or use the Wikipedia covariance.")
            n = sum(p.n_inputs for p in self.manifest.records())
            for t in missing:
                if t.name not in self.manifest.names:
                    raise ArtifactError(f"ripple.covariance 'pieces': {self.run.root} stores no inputs of {t.name}; "
                                        f"use the Wikipedia covariance.")
                self._covariances[t.name] = (stored_key_covariance(self.reader, t.name),
                                             CovarianceSource(text="the run's own pieces", n_tokens=n, layer=t.name))
            return
        with contextlib.ExitStack() as whole:  # its Wikipedia text is read once: no residual of it is kept
            for sx in self._suffix.values():
                whole.enter_context(sx.bypassed())
            self._covariances.update(cached_wikipedia_covariances(self.manifest.model.fingerprint, self.loaded.model,
                                                                  self.loaded.tokenizer, missing, rc.covariance_tokens))

    def context(self) -> EditContext:
        """What an edit method may use (:class:`~gradcouple.edits.EditContext`)."""
        if self._context is None:
            self._context = EditContext(model=self.loaded.model, targets=self.targets, pad_id=self.loaded.pad_id,
                                        reader=self.reader, covariance=lambda t: self.covariance(t)[0],
                                        prefetch=self.prefetch,
                                        tokenizer=self.loaded.tokenizer, fingerprint=self.manifest.model.fingerprint,
                                        max_length=self.max_length, seed=self.cfg.ripple.seed,
                                        prefix_cache=not self.cfg.ripple.full_model)
        return self._context

    def executing(self, lowest: Optional[int]):
        """The context every edit and measurement of edits whose lowest edited block is ``lowest`` runs in:
        :class:`~gradcouple.suffix.SuffixExecution` from that block (one per block, so residuals computed
        for one call are found by the next), or the whole model with ``ripple.full_model`` or when the
        edited layers are not blocks (``lowest`` None)."""
        if lowest is None or lowest <= 0 or self.cfg.ripple.full_model:
            return suffix_execution(self.loaded.model, None)
        if lowest not in self._suffix:
            self._suffix[lowest] = SuffixExecution(self.loaded.model, lowest)
        return self._suffix[lowest]

    def inputs(self, method: EditMethod) -> Inputs:
        """What results of edits made with ``method`` (its resolved knobs) are made from."""
        return self.run.ripple.inputs(self.manifest, self.stats, self.cfg, method)

    def results(self) -> RippleResults:
        """The result set this run's method and settings write (beside every other method's)."""
        return self.run.ripple.results(self.cfg, self.method)


def check_run(cfg: RunConfig, run_dir: str | Path, loaded: Optional[LoadedModel], prepare: bool = True,
              coupled: bool = True, encode: bool = True) -> RippleRun:
    """Load and check the run: current coupling, the extraction's model and settings, the edit method
    (its knobs: the model's published settings, ``--hparams``, then the config's) and, with
    ``prepare``, that it can edit the extraction's layers and what it reads once (covariances,
    context templates). Without ``coupled`` the coupling is neither needed nor read (``stats`` and
    ``cos`` are None: forecasts read the gradients only); without ``encode`` the pieces are not
    tokenized (``encoded`` is empty).

    Raises:
        ArtifactError: gradients or coupling missing or stale, the model differs from the
            extraction's, or the method cannot edit these target layers.
        ConfigError: an unknown method or knob.
    """
    run = RunDir(run_dir)
    cls = method_class(cfg.ripple.method)
    cls.resolve(cfg.ripple.hparams.get(cls.name), file=cfg.ripple.hparams_file)  # a bad knob fails before the model loads
    manifest = run.gradients.load_manifest()
    stats = cos = None
    if coupled:
        stats = run.coupling.current_stats(manifest)
        ids, cos = run.coupling.load_cosine()
        run.check_pieces_match(ids, run.coupling.cosine_path)
    extracted = manifest.settings()
    loaded = loaded or load_model(extracted.model.name, revision=extracted.model.revision, device=cfg.model.device,
                                  dtype=extracted.model.dtype)
    if loaded.identity().fingerprint != manifest.model.fingerprint:
        raise ArtifactError(f"model {loaded.name} is not the one the gradients in {run.root} were extracted with "
                            f"({manifest.model.name}); rerun extract.")
    method = cls.resolve(cfg.ripple.hparams.get(cls.name), model=loaded.model, file=cfg.ripple.hparams_file)
    targets = select_targets(loaded.model, extracted.model.layers, extracted.model.module)
    if [t.name for t in targets] != manifest.names:
        raise ArtifactError(f"target layers {[t.name for t in targets]} differ from the extraction's {manifest.names}.")
    reader = GradientReader(run, manifest)
    pieces = run.load_pieces()
    encoded = encode_pieces(loaded.tokenizer, pieces, extracted.data.prompt_template, extracted.extract.max_length) \
        if encode else []
    norms = torch.tensor([r.norm for r in manifest.records()], dtype=torch.float64)
    r = RippleRun(run, cfg, manifest, stats, reader, pieces, cos, loaded, targets, encoded, norms, method)
    if prepare:  # a layer sweep edits blocks the extraction need not have: its methods are checked as they edit
        method.prepare(r.context())
    return r


__all__ = ["RippleRun", "check_run"]
