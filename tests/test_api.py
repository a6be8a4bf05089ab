"""The Python API: the README's notebook example runs as written, keyword overrides reach the
config, and load_run gives the run's files as tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import gradcouple as gc
from gradcouple.resolve import resolve
from gradcouple.config import RunConfig
from gradcouple.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_notebook_example_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"<!-- notebook -->\n```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert "grad_norm" in capsys.readouterr().out and (tmp_path / "runs/nb/coupling/cosine.pt").is_file()


def test_keywords_are_the_cli_flags_and_the_stage_decides_shared_ones(tmp_path):
    cfg = resolve("ripple", tmp_path, method="rome", clamp_norm_factor=2.0, device="cpu", **{"ripple.covariance": "pieces"})
    assert (cfg.ripple.method, cfg.ripple.hparams, cfg.model.device) == ("rome", {"rome": {"clamp_norm_factor": 2.0}}, "cpu")
    assert (cfg.couple.method, cfg.ripple.covariance) == ("auto", "pieces")
    cfg = resolve("couple", tmp_path, method="dense")
    assert (cfg.couple.method, cfg.ripple.method) == ("dense", "ft")


def test_keywords_override_the_runs_saved_config(tmp_path):
    saved = RunConfig()
    saved.model.layers = "last2"
    saved.save(tmp_path / "config.json")
    cfg = resolve("couple", tmp_path, top_k=5)
    assert (cfg.model.layers, cfg.couple.top_k) == ("last2", 5)


def test_a_keyword_of_another_stage_is_refused_naming_where_it_belongs(tmp_path):
    with pytest.raises(ConfigError, match=r"extract\(\): modle= does not apply to extract \(extract's are data, "):
        resolve("extract", tmp_path, modle="gpt2")
    with pytest.raises(ConfigError, match=r"n_edits= does not apply to extract \(it is an option of ripple, run\)"):
        gc.extract(tmp_path / "r", data="p.jsonl", n_edits=3)
    with pytest.raises(ConfigError, match=r"lr= does not apply to report \(it is an option of ripple\)"):
        gc.report(tmp_path, lr=5.0)
    with pytest.raises(ConfigError, match=r"'ripple.covariance' is a setting of the ripple stage, not of couple"):
        resolve("couple", tmp_path, **{"ripple.covariance": "pieces"})


@pytest.fixture(scope="module")
def nb_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    pieces = gc.download("mquake-hard", root / "data", from_path="sample").pieces_path
    gc.extract(root / "run", data=pieces, model="llama-tiny-random", limit=30)
    gc.couple(root / "run")
    return gc.load_run(root / "run")


def test_load_run_pieces_join_the_manifest(nb_run):
    df = nb_run.pieces
    assert len(df) == 30 and {"id", "prompt", "answer", "logprob", "grad_norm", "role"} <= set(df.columns)
    assert df.logprob.tolist() == [r.logprob for r in nb_run.manifest.records()]


def test_load_run_cosine_is_indexed_by_piece_id(nb_run):
    ids, cos = nb_run.dir.coupling.load_cosine()
    assert list(nb_run.cosine.index) == ids and list(nb_run.cosine.columns) == ids
    assert torch.equal(torch.tensor(nb_run.cosine.to_numpy()), cos)


def test_load_run_pairs_and_stats_are_the_files(nb_run):
    assert nb_run.pairs.cosine.tolist() == [r.cosine for r in nb_run.dir.coupling.load_pairs()]
    assert nb_run.stats == nb_run.dir.coupling.load_stats() and nb_run.ripple is None


def test_the_api_is_plain_functions_and_importing_a_stage_changes_nothing():
    import types

    import gradcouple.stages.extract as extract_module

    assert isinstance(gc.extract, types.FunctionType) and gc.extract is gc.api.extract
    assert type(extract_module) is types.ModuleType and callable(extract_module.extract)
    assert gc.extract is gc.api.extract  # importing the stage module did not rebind the name
