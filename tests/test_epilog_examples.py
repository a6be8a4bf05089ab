"""Every example of every command's ``--help`` epilog runs (on tiny models, inputs made first), as
tests/test_doc_examples.py runs the documents' examples; a file of its own so that the two halves
run on two pytest workers."""

from __future__ import annotations

import pytest
from test_doc_examples import all_sources, offline_and_one_thread, run_examples  # noqa: F401 (the autouse fixture)


@pytest.mark.slow
@pytest.mark.parametrize("source", [s for s in all_sources() if s.endswith(" --help")])
def test_every_epilog_example_runs(source, tmp_path, monkeypatch):
    run_examples(source, tmp_path, monkeypatch)
