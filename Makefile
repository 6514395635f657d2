# MoE Fleet. Every target depends on `setup`, which is idempotent and keeps every cache inside the
# project (.cache/), so a fresh clone needs nothing but python3, node/npm and terraform on the PATH.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
ENVS := local dev staging prod
ENV ?= local
ARGS ?=

export PIP_CACHE_DIR := $(CURDIR)/.cache/pip
export npm_config_cache := $(CURDIR)/.cache/npm
export JSII_RUNTIME_PACKAGE_CACHE_ROOT := $(CURDIR)/.cache/jsii
export TF_PLUGIN_CACHE_DIR := $(CURDIR)/.cache/terraform/plugins
export CHECKPOINT_DISABLE := 1
export CDKTF_DISABLE_PLUGIN_CACHE_ENV := 1
export DISABLE_VERSION_CHECK := 1
# Written by scripts/setup.sh only when the machine has a provider filesystem mirror (DESIGN.md §2).
ifneq ($(wildcard $(CURDIR)/.tfrc),)
export TF_CLI_CONFIG_FILE := $(CURDIR)/.tfrc
endif

.PHONY: help setup test test-fast lint synth diff deploy destroy demo bench-synth clean

help:
	@echo "make demo         deploy the 'local' environment to emulated AWS (moto) and show it (ARGS=--once to exit)"
	@echo "make test         run the whole test suite (sets itself up)"
	@echo "make synth        synthesize every environment into cdktf.out/"
	@echo "make diff ENV=e   cdktf diff for one environment"
	@echo "make deploy ENV=e cdktf deploy for one environment"
	@echo "make lint         ruff"

$(STAMP): pyproject.toml package.json package-lock.json scripts/setup.sh scripts/tools-requirements.txt
	bash scripts/setup.sh
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	bash scripts/run-tests.sh $(ARGS)

test-fast: setup
	$(BIN)/pytest -m "not slow" $(ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

synth: setup
	$(BIN)/python -m stacks.app

diff: setup
	npx --no-install cdktf diff $(ENV) --skip-provider-lock

deploy: setup
	npx --no-install cdktf deploy $(ENV) --skip-provider-lock

destroy: setup
	npx --no-install cdktf destroy $(ENV) --skip-provider-lock

demo: setup
	$(BIN)/python -m infra.demo $(ARGS)

bench-synth: setup
	$(BIN)/python benchmarks/synth_time.py

clean:
	rm -rf cdktf.out .gen .pytest_cache .ruff_cache
