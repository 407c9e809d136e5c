# The two Quick start commands of the README, and what CI runs.
#
# Everything is installed into a virtual environment of this checkout, .venv/, made with
# $(PYTHON) -m venv: never into $(PYTHON)'s own site-packages, which a distribution's
# Python refuses (PEP 668, "externally-managed-environment": Debian 12, Ubuntu 23.04+)
# and CI's must not depend on. PIP_REQUIRE_VIRTUALENV makes any pip install outside a
# virtual environment fail. .venv/ is made again when pyproject.toml changes or PYTHON
# names another interpreter; `make clean-venv` removes it.
PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
export PIP_REQUIRE_VIRTUALENV := true
export PIP_DISABLE_PIP_VERSION_CHECK := true

.PHONY: demo test install install-test clean-venv

# A .venv/ made by another interpreter than $(PYTHON) is out of date.
ifneq ($(shell cat $(VENV)/.made 2>/dev/null),$(PYTHON))
$(shell rm -f $(VENV)/.made)
endif

# pip of the virtual environment; where $(PYTHON) has no ensurepip (Debian without
# python3-venv), $(PYTHON)'s own pip installing into .venv/ (pip >= 22.3).
pip_install = if $(VENV_PYTHON) -m pip --version >/dev/null 2>&1; \
	then $(VENV_PYTHON) -m pip install --quiet $(1); \
	else $(PYTHON) -m pip --python $(VENV_PYTHON) install --quiet $(1); fi

$(VENV)/.made: pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV) && $(PYTHON) -m venv --without-pip $(VENV); }
	echo '$(PYTHON)' > $@

# The package, editable, with its C hot path built in place (again when the C source or
# setup.py changes).
$(VENV)/.installed: $(VENV)/.made setup.py shmfeed/_accel.c $(wildcard shmfeed/_accel*.h)
	$(call pip_install,-e .)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(call pip_install,-e '.[test]')
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(VENV_PYTHON) examples/demo.py

# Two pytest-xdist workers: most tests wait on child processes, so two halve the time
# on two cores. Every test has its own namespace, so workers never meet.
PYTEST_WORKERS ?= 2
test: install-test
	$(VENV_PYTHON) -m mypy shmfeed
	$(VENV_PYTHON) -m pytest -q -n $(PYTEST_WORKERS)

clean-venv:
	rm -rf $(VENV)
