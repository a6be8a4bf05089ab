"""Faults of the disk and the device, through the command line: a damaged gradient manifest, an
output directory that cannot be written, a disk that fills during a shard write, and a device or
dtype that cannot run. Each gives one ``error:`` line with its documented exit code and leaves
every earlier result as it was.

One small run (seven facts, llama-tiny-random, shards of 4) is extracted and coupled once per
module; each test works on a copy of it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import write_fact_pieces
from typer.testing import CliRunner

from gradcouple.cli import app
from gradcouple.config import RunConfig
from gradcouple.stages.couple import couple
from gradcouple.stages.extract import extract
from gradcouple.io import sha256_file
from gradcouple.rundir import RunDir

runner = CliRunner()
N_PIECES = 7
EXTRACT = ["--model", "llama-tiny-random", "--layers", "all", "--shard-size", "4", "--batch-size", "4", "--device", "cpu"]


def _cfg(pieces: Path) -> RunConfig:
    cfg = RunConfig()
    cfg.data.pieces, cfg.model.name, cfg.model.layers, cfg.model.device = pieces, "llama-tiny-random", "all", "cpu"
    cfg.extract.shard_size, cfg.extract.batch_size = 4, 4
    return cfg


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_llama_loaded) -> Path:
    """A complete run: two shards (4 and 3 pieces) and a full coupling."""
    root = tmp_path_factory.mktemp("clean")
    write_fact_pieces(root / "p.jsonl", n=N_PIECES)
    cfg = _cfg(root / "p.jsonl")
    extract(cfg, root / "run", loaded=tiny_llama_loaded, show_progress=False)
    couple(cfg, root / "run", show_progress=False)
    return root


@pytest.fixture
def run(clean, tmp_path) -> Path:
    """A fresh copy of the clean run (and its pieces file beside it)."""
    shutil.copy(clean / "p.jsonl", tmp_path / "p.jsonl")
    shutil.copytree(clean / "run", tmp_path / "run")
    return tmp_path / "run"


def _files(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (temp files included)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _shards(root: Path) -> dict[str, str]:
    return {k: v for k, v in _files(root).items() if k.startswith("gradients/shard-")}


def _error_line(res, bar: str = "") -> str:
    """The output, which must be exactly one non-empty line starting with ``error:`` (after the
    progress bar ``bar ━━━ ...`` of a stage that had started)."""
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not (bar and ln.startswith(f"{bar} "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


# ---------------------------------------------------------------- 1. the manifest


def _damage(manifest: Path, how: str) -> None:
    text = manifest.read_text(encoding="utf-8")
    m = json.loads(text)
    if how == "not JSON":
        manifest.write_text(text[: len(text) // 2], encoding="utf-8")
        return
    if how == "key missing":
        del m["targets"]
    elif how == "pieces list missing":  # a key with a default: must not default to []
        del m["pieces"]
    elif how == "pieces removed":
        m["pieces"] = m["pieces"][:-2]
    elif how == "pieces reordered":
        m["pieces"] = m["pieces"][::-1]
    elif how == "two ids swapped":
        a, b = m["pieces"][0], m["pieces"][1]
        a["id"], b["id"] = b["id"], a["id"]
    elif how == "shard rows swapped":  # the shard files and their sha256 untouched
        rows = m["shards"][0]["rows"]
        rows[0], rows[1] = rows[1], rows[0]
    manifest.write_text(json.dumps(m, indent=2), encoding="utf-8")


@pytest.mark.parametrize("how, says", [
    ("not JSON", "not valid JSON"),
    ("key missing", "field 'targets' is missing"),
    ("pieces list missing", "field 'pieces' is missing"),
    ("pieces removed", "does not match its shards"),
    ("pieces reordered", "does not match its shards"),
    ("two ids swapped", "does not match the run's pieces"),
    ("shard rows swapped", "does not match its shards"),
])
def test_a_damaged_manifest_is_refused_by_couple_in_one_line(run, how, says):
    manifest = RunDir(run).gradients.manifest_path
    _damage(manifest, how)
    before = _files(run)
    res = runner.invoke(app, ["couple", "--run", str(run)])
    assert res.exit_code == 5, res.output
    line = _error_line(res)
    assert line.startswith(f"error: {manifest}: ") and says in line, line
    assert f"gradcouple extract --out {run} --overwrite" in line, line
    assert _files(run) == before  # the coupling of the clean run was neither used nor replaced


def test_a_manifest_whose_ids_were_swapped_after_couple_is_refused_by_report_and_ripple(run):
    _damage(RunDir(run).gradients.manifest_path, "two ids swapped")
    before = _files(run)
    for cmd in (["report", "--run", str(run)], ["ripple", "--run", str(run), "--n-edits", "2"]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 5, res.output
        assert "does not match the run's pieces" in _error_line(res)
    assert _files(run) == before


def test_extract_overwrite_repairs_a_damaged_manifest(run, clean):
    _damage(RunDir(run).gradients.manifest_path, "pieces reordered")
    res = runner.invoke(app, ["extract", "--data", str(run.parent / "p.jsonl"), "--out", str(run), "--overwrite", *EXTRACT])
    assert res.exit_code == 0, res.output
    assert _shards(run) == _shards(clean / "run")


# ---------------------------------------------------------------- 2. a directory that cannot be written


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(d)`` makes directory ``d`` unwritable: chmod 0o555, or, for root (whom permissions
    do not stop), os.open / os.mkdir failing with EACCES for a new entry in ``d``, as the kernel would."""
    made: list[Path] = []

    def apply(d: Path) -> None:
        if os.geteuid() != 0:
            d.chmod(0o555)
            made.append(d)
            return
        real_open, real_mkdir = os.open, os.mkdir

        def denied(path) -> bool:
            p = Path(os.fsdecode(path)).absolute()
            return p.parent == d.absolute() and not os.path.lexists(p)

        def fake_open(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and denied(path):
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
            return real_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            if denied(path):
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)

    yield apply
    for d in made:
        d.chmod(0o755)


def test_extract_into_a_read_only_run_directory_changes_nothing(run, read_only):
    before = _files(run)
    read_only(run)
    res = runner.invoke(app, ["extract", "--data", str(run.parent / "p.jsonl"), "--out", str(run), *EXTRACT])
    assert res.exit_code == 2, res.output
    line = _error_line(res)
    assert f"the directory {run} is not writable" in line and "--out" in line and "chmod u+w" in line, line
    assert _files(run) == before


def test_extract_under_a_read_only_parent_creates_nothing(run, tmp_path, read_only):
    parent = tmp_path / "locked"
    parent.mkdir()
    read_only(parent)
    res = runner.invoke(app, ["extract", "--data", str(run.parent / "p.jsonl"), "--out", str(parent / "new"), *EXTRACT])
    assert res.exit_code == 2, res.output
    assert f"the directory {parent} is not writable" in _error_line(res)
    assert list(parent.iterdir()) == []


# ---------------------------------------------------------------- 3. a disk that fills


@pytest.fixture
def disk_full_at(monkeypatch):
    """``disk_full_at("shard-00001")``: writing a file whose name contains that fails with ENOSPC
    after its first 4 KiB reached the disk (the partial temp file is really there until removed)."""
    real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen
    names: dict[int, str] = {}

    class Full:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, b):
            if self.written + len(b) > 4096:
                self.fh.write(b[: max(0, 4096 - self.written)])
                self.fh.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(b)
            return self.fh.write(b)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

    def apply(part: str) -> None:
        def mkstemp(*args, **kwargs):
            fd, path = real_mkstemp(*args, **kwargs)
            names[fd] = path
            return fd, path

        def fdopen(fd, *args, **kwargs):
            fh = real_fdopen(fd, *args, **kwargs)
            return Full(fh) if part in names.pop(fd, "") else fh

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "fdopen", fdopen)

    return apply


def test_a_disk_that_fills_during_a_shard_write_keeps_complete_shards_and_resumes(clean, tmp_path, disk_full_at, monkeypatch):
    out, args = tmp_path / "run", ["extract", "--data", str(clean / "p.jsonl"), "--out", str(tmp_path / "run"), *EXTRACT]
    disk_full_at("shard-00001")
    res = runner.invoke(app, args)
    assert res.exit_code == 6, res.output  # ResourceError
    line = _error_line(res, bar="extract")
    assert re.fullmatch(rf"error: {re.escape(str(out / 'gradients'))}: disk full while writing shard-00001\.pt; the "
                        r"extraction needs about \d+\.\d KiB more \(3 pieces × \d+\.\d KiB\); free space, then rerun the "
                        r"same command to resume \(1 complete shard is kept\), or use --out on another disk\.", line), line
    left = sorted(p.name for p in (out / "gradients").iterdir())
    assert left == ["manifest.json", "shard-00000.pt"]  # no partial shard, no temp file
    clean_shards = _shards(clean / "run")
    assert _shards(out) == {"gradients/shard-00000.pt": clean_shards["gradients/shard-00000.pt"]}
    assert len(RunDir(out).gradients.load_manifest(complete=False).shards) == 1

    monkeypatch.undo()  # space freed
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "2 (1 resumed)" in res.output
    assert _shards(out) == clean_shards
    assert RunDir(out).gradients.load_manifest().fingerprint() == RunDir(clean / "run").gradients.load_manifest().fingerprint()


# ---------------------------------------------------------------- 4. devices and dtypes


@pytest.mark.parametrize("device, says", [
    ("tpu", "--device tpu: not a device"),
    ("meta", "--device meta: gradcouple does not run on 'meta'"),
    ("cuda", "--device cuda: CUDA is not available"),
    ("mps", "--device mps: MPS is not available"),
])
def test_an_unknown_or_absent_device_is_one_line_naming_the_flag(run, monkeypatch, device, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    before = _files(run)
    res = runner.invoke(app, ["extract", "--data", str(run.parent / "p.jsonl"), "--out", str(run), *EXTRACT,
                              "--device", device])
    assert res.exit_code == 3, res.output
    assert says in _error_line(res)
    assert _files(run) == before


def test_bfloat16_on_cpu_runs_and_the_manifest_records_it(clean, tmp_path):
    res = runner.invoke(app, ["extract", "--data", str(clean / "p.jsonl"), "--out", str(tmp_path / "run"), *EXTRACT,
                              "--dtype", "bfloat16", "--limit", "4"])
    assert res.exit_code == 0, res.output
    man = RunDir(tmp_path / "run").gradients.load_manifest()
    assert (man.compute_dtype, man.config["model"]["dtype"]) == ("bfloat16", "bfloat16")
    assert all(torch.isfinite(torch.tensor(r.logprob)) for r in man.records())


def test_a_dtype_the_device_cannot_compute_in_is_refused_naming_the_flag(run, monkeypatch):
    real_ones = torch.ones

    def ones(*args, dtype=None, **kwargs):
        if dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return real_ones(*args, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch, "ones", ones)
    before = _files(run)
    res = runner.invoke(app, ["extract", "--data", str(run.parent / "p.jsonl"), "--out", str(run), *EXTRACT,
                              "--dtype", "float16"])
    assert res.exit_code == 3, res.output
    line = _error_line(res)
    assert "--dtype float16: cpu cannot compute in float16" in line and "--dtype float32" in line, line
    assert _files(run) == before
