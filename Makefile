# `make demo` and `make test` bootstrap everything they need from a clean clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PEERS  := tests/peers-debian.txt

.PHONY: demo demo-console test test-quick torture bench venv peers clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[sim,test]'
	touch $(STAMP)

# Debian packages of the real peers the tests run against (Dovecot, Postfix, fetchmail,
# swaks, clamd, wvdial, ...).  Installed only when running as root and missing.
peers:
	@missing=""; for p in $$(grep -v '^#' $(PEERS)); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then echo "peers: all installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "peers: installing$$missing"; \
	  apt-get update -qq && \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "peers: not root, cannot install$$missing (tests that need them will be skipped)"; fi

demo: venv
	$(VENV)/bin/dialmail demo

# The demo, then its daemon, simulated ISP and web console stay up until Ctrl-C.
demo-console: venv
	$(VENV)/bin/dialmail demo --stay

test: venv peers
	$(PY) -m pytest -q -ra

test-quick: venv
	$(PY) -m pytest -q -x -m 'not peer'

# The long kill -9 and carrier-drop runs, then the hostile-load tests with their figures.
HOSTILE = tests/test_hostile_conns.py tests/test_hostile_data.py tests/test_hostile_logins.py \
	tests/test_hostile_headers.py tests/test_fetch_liar.py

torture: venv peers
	$(PY) -m pytest -q -ra tests/torture $(HOSTILE) --torture-long

bench: venv peers
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
