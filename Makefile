# The two Quick start commands of the README, and what CI runs.
PYTHON ?= python3

.PHONY: demo test install install-test

install:
	$(PYTHON) -m pip install --quiet -e .

install-test:
	$(PYTHON) -m pip install --quiet -e '.[test]'

demo: install
	$(PYTHON) examples/demo.py

test: install-test
	$(PYTHON) -m mypy shmfeed
	$(PYTHON) -m pytest -q
