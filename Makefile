# StoryMem: `make demo` and `make test` work on a fresh machine (they install into .venv first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.storymem-installed
STORY  ?= examples/toy_story_reference.json
DEMO_ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser demo test test-fast bench serve stop clean

install: $(STAMP)

# torch and torchvision are installed first and pinned together (see pyproject.toml): installing
# open_clip_torch or diffusers without them in place would pull another torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The browser tests drive Debian's Chromium through Playwright (a test tool's own browser download
# does not work offline); installed once, skipped when present.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

demo: install
	$(PY) -m actors.demo --story $(STORY) $(DEMO_ARGS)

test: install browser
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

bench: install
	$(PY) bench/shot_breakdown.py

serve: install
	$(PY) -m cluster.local start

stop:
	$(PY) -m cluster.local stop

clean:
	rm -rf out .storymem
