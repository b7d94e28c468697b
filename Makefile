# Set-up is part of every target, so `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
PIP_FLAGS ?= --disable-pip-version-check -q

.PHONY: setup demo test bench

setup:
	$(PYTHON) -m pip install $(PIP_FLAGS) -r requirements-dev.txt
	$(PYTHON) -m pip install $(PIP_FLAGS) --no-build-isolation -e .

demo: setup
	$(PYTHON) examples/demo.py

# Two pytest workers (pytest-xdist): the e2e tests spend much of their time starting interpreters and
# waiting on their subprocesses, so one worker leaves half of a 2-core machine idle. A test file runs
# whole on one worker (--dist loadfile), so its module fixtures are made once.
TEST_WORKERS ?= 2

test: setup
	$(PYTHON) -m pytest -m "not gpu" -n $(TEST_WORKERS) --dist loadfile

bench: setup
	$(PYTHON) benchmarks/save_load.py
	$(PYTHON) benchmarks/save_cpu.py
	$(PYTHON) benchmarks/save_call.py
	$(PYTHON) benchmarks/resume_time.py
	$(PYTHON) benchmarks/hook_overhead.py
	$(PYTHON) benchmarks/codec.py
	$(PYTHON) benchmarks/snapshot_stall.py
	$(PYTHON) benchmarks/train_loop.py
	$(PYTHON) benchmarks/fingerprint.py
	$(PYTHON) benchmarks/gpu_capture.py
