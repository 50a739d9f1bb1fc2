# Quick start: `make serve` serves the default model; `make test` runs the whole suite.
# Both bootstrap .venv from scratch (CPU torch where no CUDA, the package, the default model).
.PHONY: venv serve generate test lint bench soak

venv:
	bash scripts/bootstrap.sh

serve: venv
	.venv/bin/sedac serve deployments/local.yaml

generate: venv
	.venv/bin/sedac generate --chat --prompt "What is the capital of France?"

test: venv
	.venv/bin/ruff check sedac_ray tests benchmarks
	.venv/bin/python -m pytest -q

bench: venv
	.venv/bin/python benchmarks/engine_speed.py

soak: venv
	.venv/bin/python benchmarks/soak.py --duration 120
