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
# Written by scripts/setup.sh only when the machine has a provider filesystem mirror (offline machines).
ifneq ($(wildcard $(CURDIR)/.tfrc),)
export TF_CLI_CONFIG_FILE := $(CURDIR)/.tfrc
endif

.PHONY: help setup test test-fast lint synth diff deploy destroy demo bench-synth clean image push render install

help:
	@echo "make demo         deploy the 'local' environment to emulated AWS (moto) and show it (ARGS=--once to exit)"
	@echo "make test         run the whole test suite (sets itself up)"
	@echo "make synth        synthesize every environment into cdktf.out/"
	@echo "make diff ENV=e   cdktf diff for one environment"
	@echo "make deploy ENV=e cdktf deploy for one environment"
	@echo "make lint         ruff and the import layering contracts (lint-imports)"
	@echo "make image        build the runtime image (docker buildx; tag: git describe)"
	@echo "make push ENV=e   push it to the environment's ECR repository"
	@echo "make render ENV=e render its Kubernetes objects into build/rendered/<env>/ (OUT=dir)"
	@echo "make install ENV=e install the runtime on the environment's cluster (ARGS=--dry-run)"

$(STAMP): pyproject.toml package.json package-lock.json scripts/setup.sh scripts/tools-requirements.txt
	bash scripts/setup.sh
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	bash scripts/run-tests.sh $(ARGS)

test-fast: setup
	$(BIN)/pytest -m "not slow" $(ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

synth: setup
	$(BIN)/python -m stacks.app

diff: setup
	npx --no-install cdktf diff $(ENV) --skip-provider-lock

deploy: setup
	npx --no-install cdktf deploy $(ENV) --skip-provider-lock

destroy: setup
	npx --no-install cdktf destroy $(ENV) --skip-provider-lock

demo: setup
	$(BIN)/python -m infra.embedded.demo $(ARGS)

bench-synth: setup
	$(BIN)/python benchmarks/synth_time.py

# ---- runtime image and Kubernetes install (images/runtime, infra/kube, docs/install.md) ----------------
IMAGE_NAME ?= moe-runtime
IMAGE_TAG ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
OUT ?= build/rendered/$(ENV)

image:
	@command -v docker >/dev/null || { echo "make image: no docker CLI on the PATH; install Docker with the buildx plugin"; exit 2; }
	@docker info >/dev/null 2>&1 || { echo "make image: the docker CLI is here but no Docker engine answers (docker info failed): start dockerd or set DOCKER_HOST"; exit 2; }
	@docker buildx version >/dev/null 2>&1 || { echo "make image: the docker buildx plugin is missing"; exit 2; }
	docker buildx build --load -f images/runtime/Dockerfile \
	  --build-arg VERSION=$(IMAGE_TAG) --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	  -t $(IMAGE_NAME):$(IMAGE_TAG) .

push: setup
	$(BIN)/python -m infra.cli.push --env $(ENV) --tag $(IMAGE_TAG) --image $(IMAGE_NAME)

render: setup
	$(BIN)/moefleet render $(ENV) --tag $(IMAGE_TAG) --out $(OUT) $(ARGS)

install: setup
	$(BIN)/moefleet install $(ENV) --tag $(IMAGE_TAG) $(ARGS)

clean:
	rm -rf cdktf.out .gen .pytest_cache .ruff_cache
