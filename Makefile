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

# Crop decoding (src/pic/data/decode.py): a libjpeg wrapper loaded with ctypes. Without a C
# compiler or libjpeg's headers (apt install libjpeg-dev) images are decoded whole instead.
JPEG_CROP := src/pic/data/_jpeg_crop.so

$(JPEG_CROP): src/pic/data/jpeg_crop.c
	$(CC) -O3 -shared -fPIC -Wall -o $@ $< -ljpeg || \
	  echo "crop decoding off: could not build $@ (needs cc and libjpeg-dev)" >&2

install: $(STAMP) $(JPEG_CROP)

# Replace Pillow by pillow-simd (SIMD resizing); torchvision's `pillow` requirement is then
# unmet on purpose, so this must run after every reinstall of torchvision.
install-simd: $(STAMP)
	$(BIN)/pip uninstall -y pillow pillow-simd
	$(BIN)/pip install --quiet --no-deps --no-build-isolation pillow-simd || \
	  $(BIN)/pip install --quiet --no-deps pillow-simd
	$(BIN)/python -c "import PIL; print('image backend: PIL', PIL.__version__)"

train: $(STAMP) $(JPEG_CROP)
	$(BIN)/python launch.py $(ARGS)

test: $(STAMP) $(JPEG_CROP)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP) $(JPEG_CROP)
	$(BIN)/python bench/train_step.py

clean:
	rm -rf outputs multirun
