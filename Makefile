# The two commands of the README's quick start. Each creates .venv on first
# use, installs what it needs into it, then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test-deps test test-slow test-tf-cpu test-min docs lint format benchmark

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# constraints.txt pins the exact versions the suite runs on; setup.cfg
# declares the ranges users install into (Colab keeps its TensorFlow).
PIP_INSTALL := $(BIN)/python -m pip install -q -c constraints.txt

demo: $(BIN)/python
	$(PIP_INSTALL) -e ".[plots]"
	$(BIN)/python -m keras_selfdistill demo --overwrite --plot plots

# The suite runs once per backend, both passes at once: each keeps about
# one core busy, so on two cores together they take the longer one's time.
# The TensorFlow pass prints as it goes, the JAX pass's log follows it.
# $(1): the tests' marker expression; $(2): settings of the JAX pass.
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider --durations=15
define BOTH_BACKENDS
	@KERAS_BACKEND=jax $(2) $(PYTEST) -m "$(1)" > $(VENV)/jax-pass.log 2>&1 & \
	jax=$$!; KERAS_BACKEND=tensorflow $(PYTEST) -m "$(1)"; tf=$$?; \
	wait $$jax; jax=$$?; \
	echo "==== JAX pass ===="; cat $(VENV)/jax-pass.log; \
	echo "TensorFlow pass exit $$tf, JAX pass exit $$jax"; \
	test $$tf -eq 0 -a $$jax -eq 0
endef

# KerasHub without its tensorflow-text, which would pull in the full
# tensorflow wheel beside an environment's tensorflow-cpu
# (docs/language-models.md): the package alone, then its other requirements.
KERAS_HUB_DEPS := absl-py numpy packaging regex rich kagglehub kagglesdk \
	sentencepiece tokenizers

test-deps: $(BIN)/python
	$(PIP_INSTALL) -e ".[test,jax,plots,tuning]"
	$(PIP_INSTALL) --no-deps keras-hub
	$(PIP_INSTALL) $(KERAS_HUB_DEPS)

# The fast tier's JAX pass compiles without most XLA optimisations: its
# tiny models spend more time compiling than running (building the tests'
# UNet takes 12.8 s, most of it compiling random initialisers, and 4.1 s
# with the setting; benchmarks/RESULTS.md). The slow tier compiles as
# users do.
JAX_FAST_COMPILE := JAX_DISABLE_MOST_OPTIMIZATIONS=1

# The fast tier (docs/development.md).
test: test-deps
	$(BIN)/ruff check keras_selfdistill tests examples benchmarks tools
	$(BIN)/ruff format --check keras_selfdistill tests examples benchmarks tools
	$(call BOTH_BACKENDS,not slow,$(JAX_FAST_COMPILE))

# The slow tier (docs/development.md); CI runs it after `make test`.
test-slow: test-deps
	$(call BOTH_BACKENDS,slow)

# The KerasHub install beside tensorflow-cpu (docs/language-models.md),
# in a venv of its own: tensorflow-cpu, Keras and tfds as a user has them,
# this package and keras-hub without their tensorflow / tensorflow-text
# requirements, then the KerasHub tests. CI runs it after `make test`.
CPU_VENV ?= .venv-tf-cpu
CPU_PIP := $(CPU_VENV)/bin/python -m pip install -q -c constraints.txt

test-tf-cpu:
	$(PYTHON) -m venv $(CPU_VENV)
	$(CPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(CPU_PIP) tensorflow-cpu keras tensorflow-datasets importlib_resources \
		pytest
	$(CPU_PIP) --no-deps . keras-hub
	$(CPU_PIP) $(KERAS_HUB_DEPS)
	@! $(CPU_VENV)/bin/python -m pip show -q tensorflow tensorflow-text \
		2>/dev/null || { echo "the full tensorflow was installed"; exit 1; }
	KERAS_BACKEND=tensorflow $(CPU_VENV)/bin/python -m pytest -q \
		-p no:cacheprovider tests/keras_hub_test.py tests/terms/on_policy_test.py

# The oldest versions setup.cfg accepts (constraints-min.txt: TensorFlow
# 2.19, Keras 3.10, tensorflow-datasets 4.9.8, NumPy 1.26, matplotlib
# 3.10, as Colab had them), in a venv of its own: the fast tier on
# TensorFlow, less what needs the extras this venv leaves out (the wheel
# build, and the example scripts and notebooks, which are all slow-tier;
# the KerasHub tests skip).
# tensorflow-cpu stands in for the same version of tensorflow. CI runs it
# after `make test-slow`.
MIN_VENV ?= .venv-min
MIN_PIP := $(MIN_VENV)/bin/python -m pip install -q -c constraints-min.txt
MIN_SKIPPED := tests/packaging_test.py tests/examples_test.py

test-min:
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_PIP) tensorflow-cpu keras tensorflow-datasets importlib_resources \
		numpy matplotlib pytest absl-py tensorboard
	$(MIN_PIP) --no-deps -e .
	KERAS_BACKEND=tensorflow $(MIN_VENV)/bin/python -m pytest -q \
		-p no:cacheprovider -m "not slow" \
		$(addprefix --ignore=,$(MIN_SKIPPED))

# The documentation site (mkdocs.yml) into site/, warnings as errors.
docs: $(BIN)/python
	$(PIP_INSTALL) -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

lint:
	$(BIN)/ruff check keras_selfdistill tests examples benchmarks tools

format:
	$(BIN)/ruff format keras_selfdistill tests examples benchmarks tools
	$(BIN)/ruff check --fix keras_selfdistill tests examples benchmarks tools

benchmark: $(BIN)/python
	$(PIP_INSTALL) -e .
	$(BIN)/python benchmarks/overhead.py
