# The two set-up commands (see README.md): `make demo` and `make test`.
# Each creates .venv if missing and installs the project into it first, with libtpu (the `tpu`
# extra) so that the ahead-of-time TPU compilation tests run on this CPU too. Installs take the exact
# versions of constraints.txt (setup.py declares compatible ranges, for installing beside other projects).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XLA_FLAGS ?=

.PHONY: demo test test-slow test-interop bench venv clean

$(STAMP): setup.py constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev,tpu]' -c constraints.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) -m sora_jax.demo --config experiments/shapes_demo.py --workdir runs/demo

test: $(STAMP)
	$(VPY) -m pytest -q -n 2 -m "not slow and not interop" tests

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow tests

test-interop: $(STAMP)
	$(VPY) -m pip install -q -e '.[dev,interop]' -c constraints.txt
	$(VPY) -m pytest -q -m interop tests

bench: $(STAMP)
	$(VPY) -m sora_jax.bench --all

clean:
	rm -rf $(VENV) runs
