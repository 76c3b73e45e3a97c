# The two commands of the README. Each sets itself up: a .venv is created and the
# package installed (with its dev extra) when missing or when pyproject.toml changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-deep lint bench bench-quick bench-peers clean

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
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

# The same suite with hypothesis searching far deeper (minutes to hours; not for CI).
test-deep: $(STAMP)
	HYPOTHESIS_PROFILE=deep $(BIN)/python -m pytest -q --timeout=0

lint: $(STAMP)
	$(BIN)/ruff check fedsm tests tools

# Benchmarks print numbers; none of them fails for being slow.
# bench: fedsm beside a plain torch loop at K = 10, 100, 1000, the 10M model and the MQTT path
# (tools/bench_compare.py, under 10 minutes), then the component benchmarks.
bench: $(STAMP)
	$(BIN)/python tools/bench_compare.py
	$(BIN)/python tools/bench_log.py
	$(BIN)/python tools/bench_mqtt.py
	$(BIN)/python tools/bench_repo.py
	$(BIN)/python tools/bench_aggregation.py
	$(BIN)/python tools/bench_scale.py --nodes 1000
	$(BIN)/python tools/bench_witness.py

# The same comparison at smaller sizes (under 2 minutes).
bench-quick: $(STAMP)
	$(BIN)/python tools/bench_compare.py --quick

# Flower's rows beside fedsm's: Flower goes into its own virtualenv, never into fedsm's.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed
$(PEERS_STAMP): tools/peers/requirements.txt
	test -x $(PEERS)/bin/python || $(PY) -m venv $(PEERS)
	echo '*' > $(PEERS)/.gitignore
	$(PEERS)/bin/python -m pip install --quiet -r tools/peers/requirements.txt
	touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python tools/bench_compare.py --only k10,k100,10m --peers $(PEERS)/bin/python

clean:
	rm -rf $(VENV) $(PEERS) build *.egg-info .pytest_cache
