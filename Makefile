PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-simd train test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Replace Pillow by pillow-simd (SIMD resizing); torchvision's `pillow` requirement is then
# unmet on purpose, so this must run after every reinstall of torchvision.
install-simd: $(STAMP)
	$(BIN)/pip uninstall -y pillow pillow-simd
	$(BIN)/pip install --quiet --no-deps --no-build-isolation pillow-simd || \
	  $(BIN)/pip install --quiet --no-deps pillow-simd
	$(BIN)/python -c "import PIL; print('image backend: PIL', PIL.__version__)"

train: $(STAMP)
	$(BIN)/python launch.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/train_step.py

clean:
	rm -rf outputs multirun
