# Ferry: two set-up commands on a fresh machine, `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LS_VENV := .localstack-venv
LS_STAMP := $(LS_VENV)/.installed
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: demo test lint typecheck format unit integration interop bench faults \
        localstack-up localstack-down localstack-venv system-packages schema clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# LocalStack pins its own boto3, so it lives in a virtualenv of its own.
$(LS_STAMP): localstack/requirements.txt
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q -r localstack/requirements.txt
	touch $(LS_STAMP)

localstack-venv: $(LS_STAMP)

# qemu-utils (qemu-img, qemu-io, qemu-nbd), libnbd-bin (nbdcopy) and rsync
# are the independent peers of the interop tests and benchmarks; the real
# guest needs qemu-system-x86, linux-image-cloud-amd64, busybox-static, cpio
# and e2fsprogs; fio (its nbd engine) loads the benchmarks. Installed when
# root, else it fails with the apt-get command: never a silent skip.
system-packages:
	@./.ci/system-packages

demo: $(STAMP)
	$(VENV)/bin/ferry-appliance demo

test: $(STAMP) $(LS_STAMP) system-packages lint typecheck
	$(PYTEST) tests/unit tests/integration tests/interop tests/faults -m "not bench"

unit: $(STAMP)
	$(PYTEST) tests/unit

integration: $(STAMP) $(LS_STAMP)
	$(PYTEST) tests/integration -m "not bench"

interop: $(STAMP) system-packages
	$(PYTEST) tests/interop -m "not bench"

lint: $(STAMP)
	$(VENV)/bin/ruff check messages appliance clients tests localstack
	$(VENV)/bin/ruff format --check messages appliance clients tests localstack
	$(VENV)/bin/lint-imports --no-cache

typecheck: $(STAMP)
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix messages appliance clients tests localstack
	$(VENV)/bin/ruff format messages appliance clients tests localstack

schema: $(STAMP)
	$(PY) -m messages.schema --write

bench: $(STAMP) $(LS_STAMP) system-packages
	$(PYTEST) tests/bench -m bench -s --timeout 3600
	$(MAKE) faults

# The fault suite and its report (build/faults/report.json): detection, repair, migrate
# back, loss window and lost writes per case. FERRY_FAULT_SCALE scales every time in it.
faults: $(STAMP) $(LS_STAMP)
	rm -rf build/faults
	$(PYTEST) tests/faults -m "not bench"; status=$$?; \
	$(PY) -m tests.faults.report || status=1; exit $$status

localstack-up: $(STAMP) $(LS_STAMP)
	$(PY) localstack/run.py up

localstack-down:
	$(PY) localstack/run.py down

clean:
	rm -rf $(VENV) $(LS_VENV) .localstack .mypy_cache .ruff_cache .pytest_cache
