# The two commands of the README. Each sets itself up: a .venv is created and the
# package installed (with its dev extra) when missing or when pyproject.toml changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-deep lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedsm demo

test: $(STAMP)
	$(BIN)/ruff check fedsm tests tools
	$(BIN)/ruff format --check fedsm tests tools
	# Two workers (the machine's two cores); a test file stays on one worker (its fixtures).
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(BIN)/python -m pytest -q -n 2 --dist loadfile

# The same suite with hypothesis searching far deeper (minutes to hours; not for CI).
test-deep: $(STAMP)
	HYPOTHESIS_PROFILE=deep $(BIN)/python -m pytest -q --timeout=0

lint: $(STAMP)
	$(BIN)/ruff check fedsm tests tools

# Benchmarks print numbers; none of them fails for being slow.
bench: $(STAMP)
	$(BIN)/python tools/bench_log.py
	$(BIN)/python tools/bench_mqtt.py
	$(BIN)/python tools/bench_repo.py
	$(BIN)/python tools/bench_aggregation.py
	$(BIN)/python tools/bench_scale.py --nodes 1000
	$(BIN)/python tools/bench_witness.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
