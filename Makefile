# One-command set-up: both targets create .venv on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(VENV_STAMP)

.PHONY: demo test lint test-deepspeed
demo: $(VENV_STAMP)
	$(PY) -m diffalign.cli demo

lint: $(VENV_STAMP)
	.venv/bin/ruff check .

test: $(VENV_STAMP)
	.venv/bin/ruff check .
	$(PY) -m pytest -q -n auto --dist worksteal

# DeepSpeed ZeRO-2 on 2 CPU processes (not in CI: the install compiles an op on first use, ~3 minutes in all)
test-deepspeed: $(VENV_STAMP)
	$(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(PY) -m pytest -q tests/test_deepspeed.py -m ''

