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

# The native library (src/pic/native.py: crop decoding, colour ops, classifier rows), loaded
# with ctypes. Without a C compiler or libjpeg's headers (apt install libjpeg-dev) the Python
# paths run. -fno-trapping-math lets the compiler vectorise the colour loops; it changes no
# result.
NATIVE := src/pic/_native.so

$(NATIVE): $(wildcard src/pic/csrc/*.c)
	$(CC) -O3 -fno-trapping-math -shared -fPIC -Wall -o $@ $^ -ljpeg -lm || \
	  echo "native library off: could not build $@ (needs cc and libjpeg-dev)" >&2

install: $(STAMP) $(NATIVE)

# Replace Pillow by pillow-simd (SIMD resizing); torchvision's `pillow` requirement is then
# unmet on purpose, so this must run after every reinstall of torchvision.
install-simd: $(STAMP)
	$(BIN)/pip uninstall -y pillow pillow-simd
	$(BIN)/pip install --quiet --no-deps --no-build-isolation pillow-simd || \
	  $(BIN)/pip install --quiet --no-deps pillow-simd
	$(BIN)/python -c "import PIL; print('image backend: PIL', PIL.__version__)"

train: $(STAMP) $(NATIVE)
	$(BIN)/python launch.py $(ARGS)

test: $(STAMP) $(NATIVE)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP) $(NATIVE)
	$(BIN)/python bench/train_step.py

clean:
	rm -rf outputs multirun
