"""Shared fixtures. The Hugging Face Hub and datasets caches live in one temporary directory made
here, before any library is imported, and removed at exit. gradcouple's own cache of dequantised
models is the user's (``$XDG_CACHE_HOME/gradcouple``): it is keyed by the GGUF file's sha256 and
verified on every load, so the suite reuses it across sessions and never deletes it; tests of the
cache itself work in their own temporary directories."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile

_CACHE = tempfile.mkdtemp(prefix="gradcouple-tests-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["HF_HOME"] = os.path.join(_CACHE, "huggingface")
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("HF_DATASETS_CACHE", None)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: each computes on one thread (two processes with
    # two threads each on two cores run several times slower), and so do the processes it starts
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gradcouple.scoring import EncodedPiece

VOCAB = 97


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(1)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    with torch.no_grad():  # non-zero biases, so the bias column is really tested
        for blk in m.transformer.h:
            blk.mlp.c_proj.bias.normal_(0, 0.5)
    return m.eval().requires_grad_(False)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(2)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return m.eval().requires_grad_(False)


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    return tiny_gpt2() if request.param == "gpt2" else tiny_llama()


def random_pieces(n: int, seed: int = 0, min_len: int = 3, max_len: int = 14) -> list[EncodedPiece]:
    """Random token sequences of unequal lengths, 1-3 answer tokens each."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        L = rng.randint(min_len, max_len)
        n_ans = rng.randint(1, min(3, L - 1))
        ids = tuple(rng.randrange(VOCAB) for _ in range(L))
        out.append(EncodedPiece(ids, L - n_ans, f"p{i}", f"a{i}"))
    return out


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct GGUF), loaded once per test session."""
    from gradcouple.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama_loaded():
    """llama-tiny-random: a random 4-block LLaMA with the in-memory byte-level tokenizer."""
    from gradcouple.models import load_model

    return load_model("llama-tiny-random", device="cpu")


def write_fact_pieces(path, n=None):
    """A pieces.jsonl of real single-hop facts and their multi-hop questions (hand-written)."""
    from gradcouple.pieces import KnowledgePiece, write_pieces

    facts = [
        ("q1", 0, "single_hop", "Who wrote Hamlet?", "William Shakespeare", "Christopher Marlowe"),
        ("q1", 1, "single_hop", "In which town was William Shakespeare born?", "Stratford-upon-Avon", None),
        ("q1", None, "multi_hop", "In which town was the author of Hamlet born?", "Stratford-upon-Avon", None),
        ("q2", 0, "cloze", "The capital of France is", "Paris", "Rome"),
        ("q2", 1, "single_hop", "Which river flows through Paris?", "the Seine", None),
        ("q2", None, "multi_hop", "Which river flows through the capital of France?", "the Seine", None),
        ("q3", 0, "cloze", "The Eiffel Tower is located in the city of", "Paris", None),
        ("q3", 1, "single_hop", "What is the largest planet in the Solar System?", "Jupiter", "Saturn"),
        ("q4", 0, "cloze", "Water is made of hydrogen and", "oxygen", None),
        ("q4", 1, "single_hop", "Who painted the Mona Lisa?", "Leonardo da Vinci", None),
    ]
    pieces = [KnowledgePiece(id=f"facts:{q}:{'q' if h is None else h}", dataset="facts", question_id=q, hop=h, kind=k,
                             prompt=p, answer=a, counterfactual=cf) for q, h, k, p, a, cf in facts[:n]]
    write_pieces(path, pieces)
    return pieces


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """``--threads`` sets torch's thread count for the process; every test starts with the session's."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


#: the test files that take longest (seconds of one worker, from `make test`'s durations), longest
#: first: pytest-xdist hands whole files (--dist loadfile) to the workers in collection order, so
#: starting with these lets the workers finish together
LONGEST_FIRST = ("test_distributed.py", "test_epilog_examples.py", "test_doc_examples.py", "test_browser.py",
                 "test_resume.py", "test_real_models.py", "test_benchmark.py", "test_freshness.py")


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every file stays in one piece, in order
