# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed-core
TEST := $(VENV)/.installed-test

.PHONY: install demo test test-tf5 fuzz lint clean

# torch first, from the pinned CUDA build (it runs on CPU), then vlp itself
$(CORE): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e .
	touch $(CORE)

# the test tools and the optional extras whose parity and metric tests run in CI; the browser
# test of vlp serve's page drives the distribution's chromium (no browser is downloaded)
$(TEST): $(CORE) .ci/constraints.txt
	$(BIN)/pip install -c .ci/constraints.txt -e ".[test,interop,caption,ray,hub,serve,tensorboard,wandb,faiss,yaml,lora,fsspec]"
	# CLIP_benchmark for vlp benchmark's parity tests, without its dependencies (see pyproject)
	$(BIN)/pip install --no-deps -c .ci/constraints.txt clip-benchmark
	if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && apt-get install -y chromium; fi
	touch $(TEST)

install: $(TEST)

demo: $(CORE)
	$(BIN)/vlp demo --out runs/demo

test: $(TEST)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q --timeout=1800
	$(MAKE) test-tf5

# the tests that touch transformers (interop, the BLIP-2 frozen LLM, lm, hub names, decoding
# parity) and vlp's tokenizers a second time, on transformers 5: .tf5/ holds it and the packages
# it needs newer than .venv's (.ci/transformers5.txt), first on PYTHONPATH; the rest is .venv's
TF5 := .tf5
TF5_TESTS := $(sort $(wildcard tests/test_interop_*.py)) tests/test_blip2.py tests/test_lm.py \
	tests/test_hub.py tests/test_decoding_parity.py tests/test_tokenizers.py

$(TF5)/.installed: .ci/transformers5.txt $(CORE)
	rm -rf $(TF5)
	$(BIN)/pip install --no-deps --target $(TF5) -r .ci/transformers5.txt
	touch $@

# the fuzz suite with many more generated inputs than CI's (VLP_FUZZ_EXAMPLES per target)
fuzz: $(TEST)
	VLP_FUZZ_EXAMPLES=$${VLP_FUZZ_EXAMPLES:-2000} $(BIN)/pytest -q -s --timeout=7200 tests/test_fuzz.py

test-tf5: $(TEST) $(TF5)/.installed
	PYTHONPATH=$(TF5) $(BIN)/python -c "import transformers as t; assert t.__version__[0] == '5', t.__version__"
	PYTHONPATH=$(TF5) $(BIN)/pytest -q --timeout=1800 $(TF5_TESTS)

lint: $(TEST)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
