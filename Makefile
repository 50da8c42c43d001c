# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create or update the virtual environment .venv with plain pip (torch and torchvision
# come from this machine's local wheels through pip; see README "Installation").

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml setup.py src/deepssim/ssim/_kernel.c src/deepssim/ssim/_volume_kernel.c \
		src/deepssim/ssim/_warp_kernel.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deepssim scan --train data/example/train --generated data/example/generated \
		--out demo-output --overwrite --group-by '^(ants_r[0-9]+|kmeans|mni|itk_[a-z0-9]+|dwi)' \
		--cache .cache/demo-embeddings.sqlite

test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/ssim_matrix.py
	$(BIN)/python benchmarks/registered_ssim.py
	$(BIN)/python benchmarks/embed_throughput.py

clean:
	rm -rf $(VENV) build demo-output .cache src/*.egg-info src/deepssim/*.so src/deepssim/*/*.so
