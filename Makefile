# `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-benchmarks lint format clean job-local

install: $(STAMP)

# CPU torch first when there is no GPU: a plain `torch` requirement would pull the large CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		$(PIP) install -q torch==2.13.0 || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/selectmoe demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q -ra --durations=15 -m "not benchmark"

# The benchmark scripts at small sizes (tests/test_benchmarks.py, ~16 min): not in CI's budget; run
# them when a change touches a benchmark or what one calls.
test-benchmarks: $(STAMP)
	$(VENV)/bin/pytest -q -ra --durations=15 -m benchmark

# Try `ray job submit` locally: a head started from the project's environment (so the job's
# `python` is .venv's), token auth on, one ray_jobs entry, then the head stopped. `ray stop` stops
# every Ray on this machine. Override the job with JOB='ray_jobs.select ...'.
JOB_PORT ?= 8390
JOB ?= ray_jobs.validate_data dataset.data_path=$(CURDIR)/../shared/data/train output_dir=$(CURDIR)/outputs/job_validate
job-local: $(STAMP)
	test -s .ray_token || $(PY) -c "import secrets; print(secrets.token_hex(32))" > .ray_token
	export PATH="$(CURDIR)/$(VENV)/bin:$$PATH" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$(CURDIR)/.ray_token"; \
	ray start --head --num-cpus=2 --dashboard-host=127.0.0.1 --dashboard-port=$(JOB_PORT) --disable-usage-stats \
	&& ray job submit --address http://127.0.0.1:$(JOB_PORT) --working-dir . -- python -m $(JOB); \
	status=$$?; ray stop >/dev/null 2>&1; exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs
