"""Target-layer selection: which linear maps define theta, per architecture.

Each architecture names its stack of transformer blocks and the module inside a block whose
weights are the default theta (the MLP output projection, as in ROME/MEMIT's choice of
editing site). GPT-2-style ``Conv1D`` stores its weight transposed (d_in x d_out); every
consumer goes through :class:`Target`, which records the orientation and the shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .artifacts import TargetShape
from .errors import ConfigError, ModelError

# model_type -> (attribute path of the block list, default module inside a block)
REGISTRY: dict[str, tuple[str, str]] = {
    "llama": ("model.layers", "mlp.down_proj"),
    "mistral": ("model.layers", "mlp.down_proj"),
    "qwen2": ("model.layers", "mlp.down_proj"),
    "qwen3": ("model.layers", "mlp.down_proj"),
    "gemma": ("model.layers", "mlp.down_proj"),
    "gemma2": ("model.layers", "mlp.down_proj"),
    "gemma3": ("model.language_model.layers", "mlp.down_proj"),
    "gemma3_text": ("model.layers", "mlp.down_proj"),
    "phi3": ("model.layers", "mlp.down_proj"),
    "olmo": ("model.layers", "mlp.down_proj"),
    "olmo2": ("model.layers", "mlp.down_proj"),
    "gpt2": ("transformer.h", "mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "gptj": ("transformer.h", "mlp.fc_out"),
    "opt": ("model.decoder.layers", "fc2"),
    "falcon": ("transformer.h", "mlp.dense_4h_to_h"),
    "bloom": ("transformer.h", "mlp.dense_4h_to_h"),
    "phi": ("model.layers", "mlp.fc2"),
}
_FALLBACK_MODULES = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc_out", "mlp.fc2", "fc2")


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


@dataclass(frozen=True)
class Target:
    """One target linear map y = W x + b.

    ``d_in``/``d_out`` are the mathematical input/output widths. ``transposed`` is True for
    GPT-2 ``Conv1D`` whose ``weight`` is stored (d_in, d_out); gradients in gradcouple are always
    laid out (d_out, d_in[+1]) with the bias as the last column.
    """

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    has_bias: bool
    transposed: bool
    block: int | None = None  #: index of the transformer block it sits in (None: chosen by a module regex)

    @property
    def n_params(self) -> int:
        """Parameters of this target: d_out * (d_in + has_bias)."""
        return self.d_out * (self.d_in + int(self.has_bias))

    @property
    def d_in_aug(self) -> int:
        """Input width with the bias column: d_in + has_bias."""
        return self.d_in + int(self.has_bias)

    def weight_matrix(self) -> torch.Tensor:
        """The (d_out, d_in[+1]) parameter matrix, bias as last column (a copy, float32)."""
        w = self.module.weight.detach()
        w = w.t() if self.transposed else w
        if self.has_bias:
            w = torch.cat([w, self.module.bias.detach()[:, None]], dim=1)
        return w.float().clone()

    def add_(self, delta: torch.Tensor) -> None:
        """Add a (d_out, d_in[+1]) update to the weights (and bias) in place."""
        w = self.module.weight
        with torch.no_grad():
            dw = delta[:, : self.d_in].to(w.dtype)
            w.add_(dw.t() if self.transposed else dw)
            if self.has_bias:
                self.module.bias.add_(delta[:, self.d_in].to(w.dtype))

    def shape_info(self) -> TargetShape:
        """The shapes recorded in the manifest."""
        return TargetShape(name=self.name, d_in=self.d_in, d_out=self.d_out, bias=self.has_bias,
                           transposed=self.transposed, n_params=self.n_params)


def _make_target(name: str, m: nn.Module, block: int | None = None) -> Target:
    if isinstance(m, nn.Linear):
        d_out, d_in = m.weight.shape
        return Target(name, m, d_in, d_out, m.bias is not None, False, block)
    if _is_conv1d(m):
        d_in, d_out = m.weight.shape
        if d_out != m.nf:
            raise ModelError(f"{name}: Conv1D weight shape {tuple(m.weight.shape)} does not match nf={m.nf}.")
        return Target(name, m, d_in, d_out, m.bias is not None, True, block)
    raise ModelError(f"{name}: is a {type(m).__name__}, not a linear layer; choose Linear/Conv1D modules with --layers re:<regex>.")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (path, block list) of the transformer blocks.

    Raises:
        ModelError: no block list found (pass ``--layers re:<regex>`` instead).
    """
    mtype = getattr(model.config, "model_type", "")
    if mtype in REGISTRY:
        path = REGISTRY[mtype][0]
        obj: nn.Module | None = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return path, obj
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n_layers and (best is None or len(name) < len(best[0])):
            best = (name, m)
    if best is None:
        raise ModelError(f"cannot find the transformer blocks of model_type '{mtype}'; pass --layers 're:<module regex>'.")
    return best


def default_module(model: nn.Module, block: nn.Module) -> str:
    mtype = getattr(model.config, "model_type", "")
    if mtype in REGISTRY:
        return REGISTRY[mtype][1]
    names = dict(block.named_modules())
    for cand in _FALLBACK_MODULES:
        if cand in names:
            return cand
    raise ModelError(f"no default target module for model_type '{mtype}'; pass --module NAME or --layers 're:<regex>'.")


def _block_index(model: nn.Module, name: str) -> int | None:
    try:
        path, _ = find_blocks(model)
    except ModelError:
        return None
    m = re.match(re.escape(path) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def block_of_name(name: str) -> int | None:
    """The block index in a target's module name ("model.layers.4.mlp.down_proj" -> 4), None without one."""
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def block_spec(blocks: list[int]) -> str:
    """Block indices as the shortest ``--layers`` list: [4, 5, 6, 8, 26, 27] -> "4-6,8,26-27"."""
    out, run = [], []
    for b in sorted(set(blocks)):
        if run and b == run[-1] + 1:
            run.append(b)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [b]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def parse_block_spec(spec: str, n_blocks: int, flag: str = "--layers") -> list[int]:
    """Parse 'last4', 'all', '26-29', '0,5,11' (negative indices count from the end).

    Raises:
        ConfigError: malformed spec or index out of range (the message names ``flag``).
    """
    s = spec.strip().lower()
    try:
        if s == "all":
            idx = list(range(n_blocks))
        elif s.startswith("last"):
            k = int(s[4:] or 1)
            if not 1 <= k <= n_blocks:
                raise ConfigError(f"{flag} {spec!r}: the model has {n_blocks} blocks; use last1..last{n_blocks} or 'all'.")
            idx = list(range(n_blocks - k, n_blocks))
        else:
            idx = []
            for part in s.split(","):
                if "-" in part.strip()[1:]:
                    a, b = part.rsplit("-", 1)
                    idx.extend(range(int(a), int(b) + 1))
                else:
                    idx.append(int(part))
            idx = [i + n_blocks if i < 0 else i for i in idx]
    except ValueError:
        raise ConfigError(f"{flag} {spec!r}: expected 'last4', 'all', a range '26-29', a list '0,5,11'"
                          f"{' or re:<regex>' if flag == '--layers' else ''}.") from None
    bad = [i for i in idx if not 0 <= i < n_blocks]
    if bad or not idx:
        raise ConfigError(f"{flag} {spec!r}: block indices must lie in 0..{n_blocks - 1} (got {bad or 'none'}).")
    return sorted(set(idx))


def select_targets(model: nn.Module, layers: str = "last4", module: str | None = None) -> list[Target]:
    """Resolve a layer spec to target linear maps, in block order.

    Args:
        layers: 'lastN', 'all', 'a-b', 'i,j,k', or 're:<regex>' matched (fullmatch) against module names.
        module: module inside each block (default: the architecture's MLP output projection).

    Raises:
        ConfigError / ModelError: bad spec, no match, or a non-linear module.
    """
    if layers.startswith("re:"):
        try:
            rx = re.compile(layers[3:])
        except re.error as e:
            raise ConfigError(f"--layers {layers!r}: invalid regex ({e}).") from None
        targets = [_make_target(n, m, _block_index(model, n)) for n, m in model.named_modules()
                   if rx.fullmatch(n) and (isinstance(m, nn.Linear) or _is_conv1d(m))]
        if not targets:
            raise ConfigError(f"--layers {layers!r}: no Linear/Conv1D module name matches the regex.")
        return targets
    path, blocks = find_blocks(model)
    mod = module or default_module(model, blocks[0])
    targets = []
    for i in parse_block_spec(layers, len(blocks)):
        sub = dict(blocks[i].named_modules()).get(mod)
        if sub is None or not (isinstance(sub, nn.Linear) or _is_conv1d(sub)):
            linear = [n for n, m in blocks[i].named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]
            what = "has no such module" if sub is None else f"has it as a {type(sub).__name__}, not a linear layer"
            raise ConfigError(f"--module {mod}: block {path}.{i} {what}; its linear layers are {', '.join(linear)}.")
        targets.append(_make_target(f"{path}.{i}.{mod}", sub, i))
    return targets
