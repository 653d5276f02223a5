# One-word targets for the dev loop. Assumes an activated venv with `pip install -e '.[dev]'`.
.PHONY: demo test lint format typecheck bench ci

demo:
	tui-trainer

test:
	python -m pytest -q

lint:
	ruff check tui_trainer tests benchmarks
	ruff format --check tui_trainer tests benchmarks

format:
	ruff format tui_trainer tests benchmarks
	ruff check --fix tui_trainer tests benchmarks

typecheck:
	mypy tui_trainer

bench:
	python benchmarks/run_all.py

ci:
	bash .ci/run
