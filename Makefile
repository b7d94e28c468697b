# Set-up is part of every target, so `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
PIP_FLAGS ?= --disable-pip-version-check -q

.PHONY: setup demo test test-fast bench

setup:
	$(PYTHON) -m pip install $(PIP_FLAGS) -r requirements-dev.txt
	$(PYTHON) -m pip install $(PIP_FLAGS) --no-build-isolation -e .

demo: setup
	$(PYTHON) examples/demo.py

test: setup
	$(PYTHON) -m pytest -m "not gpu"

bench: setup
	$(PYTHON) benchmarks/save_load.py
	$(PYTHON) benchmarks/save_cpu.py
	$(PYTHON) benchmarks/resume_time.py
	$(PYTHON) benchmarks/hook_overhead.py
	$(PYTHON) benchmarks/codec.py
	$(PYTHON) benchmarks/snapshot_stall.py
	$(PYTHON) benchmarks/train_loop.py
	$(PYTHON) benchmarks/fingerprint.py
