"""How gradients are captured: hooks that record each target layer's inputs X and output
gradients Delta = dL/dy, from which every per-example gradient G_i = Delta_i^T X_i follows.

No parameter requires grad. The first target module to run finds an output that does not
require grad and turns it into an autograd leaf, so autograd records nothing below the
lowest target layer and computes no weight gradient at all (Opacus and kronfluence capture
the same two factors, but still let autograd form the weight gradient).
"""

from __future__ import annotations

import torch

from .layers import Target


class FactorCapture:
    """Context manager that records, per target name, inputs (B, T, d_in) and output
    gradients (B, T, d_out), detached, in the compute dtype. Hooks always remove themselves.
    """

    def __init__(self, targets: list[Target]):
        self.targets = targets
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def fwd(module, args, output):
            if not torch.is_grad_enabled():
                return None
            self.inputs[name] = args[0].detach()

            def save_grad(g: torch.Tensor) -> None:
                self.grads[name] = g.detach()

            if output.requires_grad:
                output.register_hook(save_grad)
                return None
            leaf = output.detach().requires_grad_(True)
            leaf.register_hook(save_grad)
            # a clone, because some blocks (Falcon) add into the MLP output in place, which a leaf forbids
            return leaf.clone()

        return fwd

    def __enter__(self) -> "FactorCapture":
        for t in self.targets:
            self._handles.append(t.module.register_forward_hook(self._hook(t.name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
