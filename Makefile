# The two commands of the README: `make demo` and `make test`.
# Each creates (or reuses) the virtualenv .venv with Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install pillow-simd bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,plots]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stream-swav demo

# Two workers: much of the suite waits on Ray and process start-up rather than computing. Each test
# file stays in one worker (--dist loadfile), so the Ray a module starts serves all its tests.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

# Optional speed-up: swap plain Pillow for Pillow-SIMD (builds from source;
# needs a C compiler and libjpeg/zlib headers, e.g. Debian's libjpeg-dev zlib1g-dev).
pillow-simd: $(STAMP)
	$(VENV)/bin/pip uninstall -y -q pillow
	CC="cc -mavx2" $(VENV)/bin/pip install -q --no-binary :all: pillow-simd

bench: $(STAMP)
	$(VENV)/bin/python bench/decode.py
	$(VENV)/bin/python bench/learner.py

clean:
	rm -rf $(VENV) build *.egg-info
