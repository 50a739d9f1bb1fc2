# Quick start: `make serve` serves the default model; `make test` runs the whole suite.
# Both bootstrap .venv from scratch (CPU torch where no CUDA, the package, the default model).
.PHONY: venv serve generate test test-fast lint docs bench soak

venv:
	bash scripts/bootstrap.sh

serve: venv
	.venv/bin/sedac serve deployments/local.yaml

generate: venv
	.venv/bin/sedac generate --chat --prompt "What is the capital of France?"

test: venv
	.venv/bin/ruff check sedac_ray tests benchmarks
	.venv/bin/python -m pytest -q

# The fast tier: tiny config-built models, no Ray, no real model, no subprocesses.
test-fast: venv
	.venv/bin/python -m pytest -q -m "not slow"

lint: venv
	.venv/bin/ruff check sedac_ray tests benchmarks

# docs/benchmarks.md is generated from benchmarks/results/*.json; a test checks it is current.
docs: venv
	.venv/bin/python benchmarks/tables.py --out docs/benchmarks.md

bench: venv
	.venv/bin/python benchmarks/engine_speed.py

soak: venv
	.venv/bin/python benchmarks/soak.py --duration 120
