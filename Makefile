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

# The whole suite, then (when no ARGS narrow it) the numerics tests again under the CPU dispatch
# of an AVX2-only machine (no AVX-512, no native bf16): tolerances must hold on either kind. A
# fresh inductor cache, since kernels compiled for AVX-512 would be reused otherwise.
NUMERICS := tests/test_losses.py tests/test_pic_scale.py tests/test_distributed.py \
	tests/test_knn_schedules.py tests/test_eval.py tests/test_trainer_options.py \
	tests/test_methods.py

# One pytest-xdist worker per core, the SLURM tests together in one of them (tests/conftest.py).
# --durations=20: CI's log names the slowest tests.
XDIST := -n auto --dist loadgroup
test: $(STAMP) $(NATIVE)
	$(BIN)/python -m pytest $(XDIST) --durations=20 $(ARGS)
	@if [ -z "$(ARGS)" ]; then \
	  echo "== numerics under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"; \
	  cache=$$(mktemp -d) && ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
	    TORCHINDUCTOR_CACHE_DIR=$$cache $(BIN)/python -m pytest $(XDIST) -q -m "not slow and not slurm" \
	    $(NUMERICS); rc=$$?; rm -rf $$cache; exit $$rc; fi

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP) $(NATIVE)
	$(BIN)/python bench/train_step.py

clean:
	rm -rf outputs multirun
