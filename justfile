# jetspool's everyday commands. `just` alone lists them.

venv := ".venv/bin"

default:
    @just --list

# --- run -------------------------------------------------------------------------------

# the whole stack with demo functions, embedded NATS (data in ./jetspool-data)
run *args:
    {{venv}}/jetspool up --demo {{args}}

# a 3-node NATS JetStream cluster on loopback (4222-4224; --client-ports/--route-ports to move it), for `nats.replicas: 3`; Ctrl-C stops it
cluster *args:
    {{venv}}/python -m jetspool.cluster {{args}}

# --- check -----------------------------------------------------------------------------

# everything CI runs: install, lint, type-check, test
ci:
    bash .ci/run

# the test suite (pass pytest arguments, e.g. `just test -k callback`)
test *args:
    {{venv}}/pytest {{args}}

# ruff and mypy
lint:
    {{venv}}/ruff check services tests
    {{venv}}/ruff format --check services tests
    {{venv}}/mypy

# apply ruff's fixes and formatting
fmt:
    {{venv}}/ruff check --fix services tests
    {{venv}}/ruff format services tests

# --- measure ---------------------------------------------------------------------------

# benchmarks (not tests): every workload of tests/bench against real processes; appends to
# docs/bench/report.md. Installs what it needs (wrk, redis-server, the `bench` extra) first.
# e.g. `just bench --quick`, `just bench --only submit,end_to_end`, `just bench --celery`
[positional-arguments]
bench *args:
    bash tests/bench/setup.sh
    {{venv}}/python -m tests.bench "$@"
