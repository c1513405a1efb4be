# Waybill: `make run` starts the whole platform locally, `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test test-unit test-integration test-rabbitmq lint format bench chaos scale browser clean

$(STAMP): setup.cfg setup.py clients/python/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Waybill needs Python 3.11 or newer") if sys.version_info < (3, 11) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet -e ./clients/python
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/waybill run

# Branch coverage of app, workers and config, the processes the tests start
# included ([coverage:run] in setup.cfg). Each run keeps its data in a
# directory of its own under var/ (.ci/run runs two suites at once in one
# checkout), removed once the report is printed.
COVERAGE_ARGS := --cov=app --cov=workers --cov=config --cov-branch --cov-report=term:skip-covered

test: install
	@mkdir -p var
	data=$$(mktemp -d "$(CURDIR)/var/coverage.XXXXXX"); \
	COVERAGE_FILE="$$data/.coverage" $(BIN)/pytest $(COVERAGE_ARGS) $(PYTEST_ARGS); \
	status=$$?; rm -rf "$$data"; exit $$status

test-unit: install
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: install
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

# The integration, chaos and scale tests again with RabbitMQ as Celery's broker
# (each run in a virtual host of its own); .ci/run runs it after `make test`.
AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/
test-rabbitmq: install
	TEST_AMQP_URL=$(AMQP_URL) $(BIN)/pytest tests/integration tests/chaos tests/scale $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The long chaos run (a short one is part of `make test`): thousands of tasks,
# repeated worker kills, Redis and PostgreSQL restarts. Under 20 minutes.
chaos: install
	CHAOS_TASKS=$${CHAOS_TASKS:-3000} CHAOS_WORKER_KILLS=$${CHAOS_WORKER_KILLS:-8} \
	CHAOS_CHILD_KILLS=$${CHAOS_CHILD_KILLS:-8} CHAOS_REDIS_RESTARTS=$${CHAOS_REDIS_RESTARTS:-3} \
	CHAOS_REDIS_ROLLBACKS=$${CHAOS_REDIS_ROLLBACKS:-1} \
	CHAOS_POSTGRES_RESTARTS=$${CHAOS_POSTGRES_RESTARTS:-3} CHAOS_SECONDS=$${CHAOS_SECONDS:-900} \
	CHAOS_REPORT=$${CHAOS_REPORT:-tests/chaos/last-run.json} \
	$(BIN)/pytest tests/chaos -s -p no:cacheprovider $(PYTEST_ARGS)

# The long scale run (a short one is part of `make test`): three nodes on
# PostgreSQL, RabbitMQ and Redis, thousands of tasks, a whole node killed and
# started again three times. About 5 minutes.
SCALE_DATABASE_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
scale: install
	DATABASE_URL=$${DATABASE_URL:-$(SCALE_DATABASE_URL)} TEST_AMQP_URL=$(AMQP_URL) \
	SCALE_TASKS=$${SCALE_TASKS:-3000} SCALE_NODE_KILLS=$${SCALE_NODE_KILLS:-3} SCALE_SECONDS=$${SCALE_SECONDS:-600} \
	SCALE_REPORT=$${SCALE_REPORT:-tests/scale/last-run.json} \
	$(BIN)/pytest tests/scale -s -p no:cacheprovider $(PYTEST_ARGS)

# The operator console in Debian's Chromium (apt-get install chromium), driven by
# Playwright; part of `make test` too. This target also keeps the screenshots of
# each page in docs/images, for docs/operations.rst.
browser: install
	CONSOLE_SCREENSHOTS=$(CURDIR)/docs/images $(BIN)/pytest tests/browser -p no:cacheprovider $(PYTEST_ARGS)

# make bench: the whole suite (about 23 minutes); make bench BENCH_ARGS=--quick: a 2-minute smoke run.
bench: install
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info
