# Two commands on a fresh machine: `make run` (a media node + site on embedded defaults) and
# `make test` (the whole suite).  Each installs what it needs: Debian packages when root, a
# virtualenv, the project with its compiled codecs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup system-deps frontend lint bench wheel clean

run: setup
	$(BIN)/watchbuy serve

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(BIN)/python bench/ci_check.py

setup: system-deps $(STAMP) frontend

# mpegts.js and Chart.js for the site, from npm (package.json and the lock file are committed,
# node_modules never is).
FRONTEND := site/frontend
frontend: $(FRONTEND)/node_modules/.package-lock.json

$(FRONTEND)/node_modules/.package-lock.json: $(FRONTEND)/package.json $(FRONTEND)/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm is missing: install Node.js and npm (apt-get install nodejs npm)"; exit 1; }
	cd $(FRONTEND) && npm ci --no-audit --no-fund --loglevel=error

# Debian's packages the project uses as real peers: ffmpeg (OBS's stand-in, and a player),
# chromium (the browser tests), nodejs/npm (the site's front-end packages).  Installed when
# missing and we are root; otherwise we say what is missing.
DEBIAN_PACKAGES := ffmpeg:ffmpeg chromium:chromium npm:npm
system-deps:
	@missing=""; for pair in $(DEBIAN_PACKAGES); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing from Debian's packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing:$$missing (apt-get install$$missing)"; \
	  fi; \
	fi

$(STAMP): pyproject.toml setup.py engine/*.pyx engine/*.pxi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel Cython
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider bench --benchmark-only

# The release wheel (deploy/README.md, "Releasing"): built with the venv's setuptools and Cython,
# then repaired by auditwheel into a manylinux tag, so one wheel installs on any Linux of the
# build machine's architecture whose glibc is at least the tag's.  --plat is a floor, not a target: the build fails if
# the codecs need a newer glibc than MANYLINUX (2.34 = Amazon Linux 2023; Ubuntu 22.04 has 2.35),
# and auditwheel picks the oldest tag their symbols allow (manylinux_2_17 today).  The codecs
# link nothing but libc, so there is nothing to graft and no patchelf is needed ("--patcher
# none"); should one ever link another library, repair stops, naming the file (then install
# patchelf and drop the option, so auditwheel can graft it).
MANYLINUX ?= manylinux_2_34
RAW_WHEELS := build/raw-wheel
# dist/WHEEL names the wheel for deploy/user-data.sh, which installs the CPython of its tag
# (cp311: the venv's 3.11) when the AMI's python3 is another one.
wheel: $(STAMP)
	rm -rf $(RAW_WHEELS) dist/watchbuy-*.whl dist/WHEEL
	$(BIN)/python -m build --wheel --no-isolation --outdir $(RAW_WHEELS) .
	$(BIN)/python -m auditwheel repair --patcher none --plat $(MANYLINUX)_$$(uname -m) \
	  --wheel-dir dist $(RAW_WHEELS)/watchbuy-*.whl
	cd dist && ls watchbuy-*.whl > WHEEL

clean:
	rm -rf $(VENV) build dist *.egg-info engine/*.so engine/*.c
