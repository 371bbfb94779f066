# The two commands of the README: `make demo` and `make test`.
# Each creates (or reuses) the virtualenv .venv with Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install pillow-simd bench clean

# pip installs uv, and uv installs the rest: it downloads and unpacks in parallel (the CUDA build of
# torch and its libraries are ~5.5 GB unpacked), a fresh install taking ~1-2 minutes where pip took ~4.
# uv reads no pip.conf: a private index is named with UV_INDEX_URL / UV_EXTRA_INDEX_URL. Bytecode is
# compiled at install so that no process compiles torch again (some environments set
# PYTHONDONTWRITEBYTECODE, and then every import would).
# A constraint file configured for pip (`pip config list`: global.constraint, or PIP_CONSTRAINT)
# holds for uv too: an environment that caps torch gets the same torch whichever installs it.
# (Recursive `=`: pip is asked only when the install recipe runs, not on every make.)
PIP_CONSTRAINT_FILE = $(shell $(PYTHON) -m pip config list 2>/dev/null \
	| sed -n "s/^\(global\|:env:\)\.constraint='\(.*\)'$$/\2/p" | head -n 1)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv
	$(VENV)/bin/uv pip install --python $(VENV)/bin/python -q --compile-bytecode \
		$(addprefix --constraint ,$(PIP_CONSTRAINT_FILE)) -e '.[test,plots]'
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
