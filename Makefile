# The two set-up commands (see README.md): `make demo` and `make test`.
# Each creates .venv if missing and installs the project into it first, with libtpu (the `tpu`
# extra) so that the ahead-of-time TPU compilation tests run on this CPU too. Installs take the exact
# versions of constraints.txt (setup.py declares compatible ranges, for installing beside other projects).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XLA_FLAGS ?=

.PHONY: demo test test-slow test-interop bench check-pods venv clean

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

# Every pod preset compile-checked for its TPU slice on this machine (no TPU; docs/pods.md), one at a
# time: each prints its memory per chip, estimated MFU, peak host memory and wall time (the JSON line);
# full logs go to runs/check-pods/. A preset that does not fit or fails its check is reported and the
# others still run; the target fails at the end if any did.
POD_CONFIGS := sora_b.py sora_xl.py sora_xl.py:topology=v6e:16x16 sora_xl_minute.py \
	wan21_t2v_1_3b.py wan21_t2v_1_3b.py:topology=v5p:4x4x4 wan21_t2v_14b.py

check-pods: $(STAMP)
	@mkdir -p runs/check-pods; failed=""; \
	for c in $(POD_CONFIGS); do \
	  log=runs/check-pods/$$(echo $$c | tr ':=' '__').log; \
	  echo "compile_check --config experiments/$$c"; \
	  $(VPY) -m sora_jax.compile_check --config experiments/$$c > $$log 2>&1; rc=$$?; \
	  grep -E '^(memory per chip|step time|host):' $$log; tail -n 1 $$log; \
	  [ $$rc = 0 ] || { echo "  exit status $$rc (log: $$log)"; failed="$$failed $$c"; }; \
	done; \
	[ -z "$$failed" ] || { echo "failed:$$failed"; exit 1; }

clean:
	rm -rf $(VENV) runs
