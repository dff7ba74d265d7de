# celltype-bench: `make run` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROFILE ?= profiles/local

.PHONY: venv run test lint dryrun clean retry-failed

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/snakemake --profile $(PROFILE)
	$(BIN)/snakemake --profile $(PROFILE) --report results/report.html
	@echo ""
	@echo "Report:  $(CURDIR)/results/report.html"
	@echo "Tables:  $(CURDIR)/results/tables/"
	@echo "Figures: $(CURDIR)/results/figures/"

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/snakemake --lint

retry-failed: venv
	$(BIN)/celltype-bench retry-failed
	$(MAKE) run

dryrun: venv
	$(BIN)/snakemake -n --profile $(PROFILE)

clean:
	rm -rf results data logs .snakemake
