# Everything sets itself up: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
VENV_LS := .venv-ls
PY := $(VENV)/bin/python
CACHE := $(CURDIR)/.cache
export GKC_CACHE := $(CACHE)
export NLTK_DATA := $(CACHE)/nltk_data
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup setup-ls lint test test-fast demo bench clean

setup: $(VENV)/.installed $(CACHE)/.demo-model $(NLTK_DATA)/corpora/wordnet/lexnames

/usr/share/wordnet/data.noun:
	@echo "installing WordNet (Debian wordnet-base, wordnet-sense-index)"
	(apt-get install -y -q wordnet-base wordnet-sense-index || (apt-get update -q && apt-get install -y -q wordnet-base wordnet-sense-index)) >/dev/null

$(VENV)/.installed: requirements.txt requirements-serve.txt requirements-openvino.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(NLTK_DATA)/corpora/wordnet/lexnames: /usr/share/wordnet/data.noun $(VENV)/.installed
	$(PY) -c "from model.wordnet import ensure_wordnet; ensure_wordnet()"

$(CACHE)/.demo-model: demo/assets/demo-clip-weights.pt $(VENV)/.installed
	$(PY) -c "from demo.train_clip import materialize; print(materialize())"
	touch $@

# The job queue's tests start their own redis-server (Debian's) by PID.
/usr/bin/redis-server:
	@echo "installing Redis (Debian redis-server), for the job queue's tests"
	(apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server)) >/dev/null

# Label Studio lives in its own environment: its pins must not meet the model's.
setup-ls: $(VENV_LS)/.installed
$(VENV_LS)/.installed: constraints-label-studio.txt
	test -x $(VENV_LS)/bin/python || $(PYTHON) -m venv $(VENV_LS)
	$(VENV_LS)/bin/pip install -q label-studio==1.23.2 -c constraints-label-studio.txt
	touch $@

# Lint settings (and why a rule is off) are in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check .

test: lint setup-ls /usr/bin/redis-server
	$(PY) -m pytest -q tests

test-fast: lint
	$(PY) -m pytest -q tests -m "not labelstudio"

# make demo LS_PORT=8081 BACKEND_PORT=9091 when 8080 or 9090 is taken.
LS_PORT ?= 8080
BACKEND_PORT ?= 9090
demo: setup setup-ls
	$(PY) -m demo --ls-port $(LS_PORT) --backend-port $(BACKEND_PORT)

bench: setup
	$(PY) -m bench.speed
	$(PY) -m bench.throughput
	$(PY) -m bench.postprocess
	$(PY) -m bench.prelabel_quality
	$(PY) -m bench.partial_labels
	$(PY) -m bench.interactive
	$(PY) -m bench.accuracy
	$(PY) -m bench.calibration
	$(PY) -m bench.precision
	$(PY) -m bench.active_learning
	$(PY) -m bench.attack

clean:
	rm -rf $(VENV) $(VENV_LS) $(CACHE) .demo
