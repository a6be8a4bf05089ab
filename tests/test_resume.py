"""Interrupted stages resume: a ripple keeps every finished edit and a rerun makes only the
missing ones; an extraction killed at a random shard keeps its complete shards. Either way the
result equals an uninterrupted run's. In process (KeyboardInterrupt) and across SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from test_benchmark import coupled_edit_run
from test_ripple import _run
from typer.testing import CliRunner

from gradcouple.cli.app import app
from gradcouple.rundir import RunDir
from gradcouple.stages import benchmark as benchmark_mod
from gradcouple.stages import ripple as ripple_mod
from gradcouple.stages.ripple import ripple


def _same(a, b):
    """Summaries equal apart from wall times, the machine's load, the resumed count and what the suffix
    execution computed (a resumed run computes residuals for fewer edits)."""
    skip = ("seconds", "resumed_edits", "edits", "device", "suffix")

    def strip(s):
        d = {k: v for k, v in s.model_dump(mode="json").items() if k not in skip}
        if d.get("covariance"):
            d["covariance"].pop("file")  # where the user's cache is
        return d

    assert strip(a) == strip(b)
    assert [e.model_dump(exclude={"seconds", "phases"}) for e in a.edits] == \
        [e.model_dump(exclude={"seconds", "phases"}) for e in b.edits]


def _interrupt_after(monkeypatch, module, name, n):
    """Make ``module.name`` raise KeyboardInterrupt on its (n+1)-th call; returns the call counter."""
    real, calls = getattr(module, name), []

    def fake(*a, **kw):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(module, name, fake)
    return calls


def _counting(monkeypatch, module, name):
    real, calls = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    return calls


def test_pieces_mode_resumes_after_an_interrupt(tmp_path, tiny_llama_loaded, monkeypatch):
    cfg = _run(tmp_path, tiny_llama_loaded, n_edits=4)
    run = tmp_path / "run"
    shutil.copytree(run, tmp_path / "whole")
    whole = ripple(cfg, tmp_path / "whole", loaded=tiny_llama_loaded, show_progress=False).summary

    _interrupt_after(monkeypatch, ripple_mod, "apply_edit", 2)
    with pytest.raises(KeyboardInterrupt):
        ripple(cfg, run, loaded=tiny_llama_loaded, show_progress=False)
    assert not RunDir(run).ripple.exists()
    journals = list(RunDir(run).ripple.dir.rglob("journal-*.jsonl"))
    assert len(journals) == 1 and len(journals[0].read_text().splitlines()) == 2

    monkeypatch.undo()
    calls = _counting(monkeypatch, ripple_mod, "apply_edit")
    resumed = ripple(cfg, run, loaded=tiny_llama_loaded, show_progress=False).summary
    assert len(calls) == 2 and resumed.resumed_edits == 2 and resumed.n_edits == 4
    _same(resumed, whole)
    assert RunDir(run).ripple.load()[1] == RunDir(tmp_path / "whole").ripple.load()[1]
    assert not list(RunDir(run).ripple.dir.rglob("journal-*.jsonl"))


def test_a_journal_of_other_settings_is_not_used(tmp_path, tiny_llama_loaded, monkeypatch):
    cfg = _run(tmp_path, tiny_llama_loaded, n_edits=3)
    _interrupt_after(monkeypatch, ripple_mod, "apply_edit", 2)
    with pytest.raises(KeyboardInterrupt):
        ripple(cfg, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False)
    monkeypatch.undo()
    calls = _counting(monkeypatch, ripple_mod, "apply_edit")
    other = cfg.model_copy(update={"ripple": cfg.ripple.model_copy(update={"hparams": {"ft": {"steps": 2, "lr": 1e-3}}})})
    s = ripple(other, tmp_path / "run", loaded=tiny_llama_loaded, show_progress=False).summary
    assert len(calls) == 3 and s.resumed_edits == 0


@pytest.fixture(scope="module")
def bench_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cfg = coupled_edit_run(root, n_edits=4, tests_per_edit=2, steps=4, covariance_tokens=1000, resamples=30)
    shutil.copytree(root / "run", root / "whole")
    return cfg, root, ripple(cfg, root / "whole", show_progress=False).summary


def test_benchmark_mode_resumes_after_an_interrupt(bench_cfg, monkeypatch):
    cfg, root, whole = bench_cfg
    run = root / "interrupted"
    shutil.copytree(root / "run", run)
    _interrupt_after(monkeypatch, benchmark_mod, "_measure_batch", 3)
    with pytest.raises(KeyboardInterrupt):
        ripple(cfg, run, show_progress=False)
    monkeypatch.undo()
    calls = _counting(monkeypatch, benchmark_mod, "_measure_batch")
    resumed = ripple(cfg, run, show_progress=False).summary
    assert len(calls) == 1 and resumed.resumed_edits == 3
    _same(resumed, whole)
    assert RunDir(run).ripple.load()[1] == RunDir(root / "whole").ripple.load()[1]


KILLER = """
import sys, time
from gradcouple.stages import benchmark
real = benchmark._measure_batch
def slow(*a, **kw):
    out = real(*a, **kw)
    time.sleep(0.4)  # a window for the test to kill the process between edits and within one
    return out
benchmark._measure_batch = slow
from gradcouple.cli.app import main
sys.argv = ["gradcouple", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_benchmark_mode_resumes_after_sigkill(bench_cfg):
    cfg, root, whole = bench_cfg
    run = root / "killed"
    shutil.copytree(root / "run", run)
    cmd = [sys.executable, "-c", KILLER, "ripple", "--run", str(run)]  # the run's config.json holds the settings
    env = dict(os.environ)  # the same threads as the uninterrupted run: the same floats
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    journal = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        journal = next(RunDir(run).ripple.dir.rglob("journal-*.jsonl"), None)
        if journal and len(journal.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(journal.read_text().splitlines())
    assert 2 <= done < 4 and not RunDir(run).ripple.exists()

    out = CliRunner().invoke(app, cmd[3:])  # the same command, rerun (in this process: the same code, no start-up)
    assert out.exit_code == 0, out.output
    resumed, _ = RunDir(run).ripple.load()
    assert resumed.resumed_edits == done
    _same(resumed, whole)


EXTRACT_KILLER = """
import sys, time
from gradcouple.stores import shards
real = shards.ShardWriter.write
def slow(self, path, taken):
    time.sleep(0.3)  # a window for the test to kill the process between shards
    return real(self, path, taken)
shards.ShardWriter.write = slow
from gradcouple.cli.app import main
sys.argv = ["gradcouple", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_extract_killed_at_a_random_shard_resumes_to_the_same_shards(tmp_path):
    import random

    from conftest import write_fact_pieces

    write_fact_pieces(tmp_path / "p.jsonl")
    args = ["extract", "--data", str(tmp_path / "p.jsonl"), "--model", "llama-tiny-random", "--layers", "all",
            "--shard-size", "2"]
    clean = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "clean")])  # same code, in this process
    assert clean.exit_code == 0, clean.output
    n_shards = len(RunDir(tmp_path / "clean").gradients.load_manifest().shards)
    kill_after = random.Random(0).randrange(1, n_shards)  # complete shards before the kill
    run = RunDir(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-c", EXTRACT_KILLER, *args, "--out", str(run.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(run.gradients.dir.glob("shard-*.pt"))) < kill_after:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = run.gradients.load_manifest(complete=False)
    # a shard file the writing thread finished after the manifest was last saved is not listed: it is redone
    kept = {s.file: (run.gradients.dir / s.file).read_bytes() for s in partial.shards}
    assert kill_after - 1 <= len(kept) < n_shards and not partial.complete

    again = CliRunner().invoke(app, [*args, "--out", str(run.root)])  # the same command, rerun in this process
    assert again.exit_code == 0, again.output
    assert f"({len(kept)} resumed)" in " ".join(again.output.split())
    resumed, whole = run.gradients.load_manifest(), RunDir(tmp_path / "clean").gradients.load_manifest()
    assert resumed.fingerprint() == whole.fingerprint()
    assert all((run.gradients.dir / name).read_bytes() == data for name, data in kept.items())  # kept shards untouched


def test_the_wikipedia_covariance_is_computed_once_per_model_and_a_damaged_file_again(bench_cfg, monkeypatch, tmp_path,
                                                                                     caplog):
    from gradcouple import keys

    monkeypatch.setenv("GRADCOUPLE_CACHE", str(tmp_path / "cache"))
    cfg, root, _ = bench_cfg
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        shutil.copytree(root / "whole", run)
        shutil.rmtree(RunDir(run).ripple.dir)
    calls = _counting(monkeypatch, keys, "wikipedia_covariances")
    first = ripple(cfg, runs[0], show_progress=False).summary
    second = ripple(cfg, runs[1], show_progress=False).summary  # another run of the same model: read from the cache
    assert len(calls) == 1 and first.covariance == second.covariance
    files = list((tmp_path / "cache" / "covariance").glob("*.pt"))
    assert [str(f) for f in files] == [first.covariance.file] and first.covariance.sha256
    _same(second, first)  # (not ``whole``: the user cache may hold this covariance summed on another thread count)
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # a damaged file: recomputed, with a warning naming it
    files[0].write_bytes(bytes(data))
    shutil.rmtree(RunDir(runs[1]).ripple.dir)
    again = ripple(cfg, runs[1], show_progress=False).summary
    assert len(calls) == 2 and f"key covariance cache {files[0]} is damaged" in caplog.text
    assert again.covariance == first.covariance
    other = cfg.model_copy(update={"ripple": cfg.ripple.model_copy(update={"covariance_tokens": 512})})
    ripple(other, runs[1], show_progress=False)
    assert len(calls) == 3  # another token budget is another covariance
