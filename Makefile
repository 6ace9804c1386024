# The two commands a newcomer needs: `make run` and `make test`. Everything else is a step of theirs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEV_DIR ?= dev
GEN := gen/faceseal/v1
PROTOS := $(wildcard protos/faceseal/v1/*.proto)
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
CHECKOV := $(TOOLS)/checkov/bin/checkov

.PHONY: run test runtime venv gen test-deps lint lint-deploy interop-deps typecheck buf-lint pytest clean dev-pki

run: runtime gen $(DEV_DIR)/faceseal.toml
	$(BIN)/faceseald serve --config $(DEV_DIR)/faceseal.toml

test: venv gen test-deps lint lint-deploy typecheck buf-lint interop-deps pytest

# `make run` needs the daemon and the stub generator only; `make test` adds the dev tools.
runtime: $(VENV)/.runtime
venv: $(VENV)/.installed

$(VENV)/.runtime: pyproject.toml
	mkdir -p $(GEN)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[gen]'
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# Generated protobuf code comes from protos/ only; it is not committed.
gen: $(GEN)/.generated

$(GEN)/.generated: $(PROTOS) $(VENV)/.runtime
	rm -rf gen && mkdir -p $(GEN)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iprotos \
	  --python_out=gen --grpc_python_out=gen --mypy_out=gen --mypy_grpc_out=gen $(PROTOS)
	touch $(GEN)/__init__.py $(GEN)/py.typed
	touch $@

$(DEV_DIR)/faceseal.toml: | runtime gen
	$(BIN)/faceseald init --dev $(DEV_DIR)

dev-pki: $(DEV_DIR)/faceseal.toml

# System packages for the integration tests (installed when root; see the script).
test-deps:
	scripts/install-test-deps.sh

lint: venv
	$(BIN)/ruff check server client tests bench deploy
	$(BIN)/ruff format --check server client tests bench deploy

# mypy cannot follow setuptools' editable-install finder, so it reads a symlinked view of the
# namespace package instead: build/typecheck/faceseal/{server,client,v1}.
typecheck: venv gen
	rm -rf build/typecheck && mkdir -p build/typecheck/faceseal
	ln -s ../../../server build/typecheck/faceseal/server
	ln -s ../../../client build/typecheck/faceseal/client
	ln -s ../../../$(GEN) build/typecheck/faceseal/v1
	cd build/typecheck && ../../$(BIN)/mypy --namespace-packages --explicit-package-bases \
	  --config-file ../../pyproject.toml -p faceseal.server -p faceseal.client

$(BUF):
	mkdir -p $(TOOLS)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@1

# checkov pins old dependencies, so it lives in a venv of its own.
$(CHECKOV):
	$(PYTHON) -m venv $(TOOLS)/checkov
	$(TOOLS)/checkov/bin/pip install --quiet --disable-pip-version-check 'checkov>=3.2,<4'

# The Node.js interoperability client (tests/test_interop_node.py); the lock file is committed.
interop/node/node_modules/.package-lock.json: interop/node/package-lock.json
	cd interop/node && npm ci --ignore-scripts --no-audit --no-fund

interop-deps: interop/node/node_modules/.package-lock.json

lint-deploy: venv $(CHECKOV)
	$(BIN)/hadolint deploy/docker/Dockerfile
	$(BIN)/shellcheck --shell=sh deploy/docker/faceseal-healthcheck.sh deploy/compose/bao-init.sh
	$(BIN)/kubernetes-validate --strict --quiet $(filter-out %/kustomization.yaml %/servicemonitor.yaml,$(wildcard deploy/kubernetes/*.yaml))
	$(CHECKOV) -d deploy/kubernetes --framework kubernetes --skip-download --compact --quiet

buf-lint: $(BUF)
	cd protos && ../$(BUF) lint

pytest: venv gen
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf gen build $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
