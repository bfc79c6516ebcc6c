# Two entry points do all set-up on a fresh machine:
#   make train   builds and runs the main job (CIFAR ResNet-20 baseline)
#   make test    runs the whole test suite (what CI runs)
# Both install libtorch (PyPI's torch==2.11.0) into .venv on first use.

SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
DATA ?= ../shared/data/cifar10
OUT ?= runs/resnet20-baseline
ARGS ?=

.PHONY: setup setup-test build train test bench clean

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --with-timm

build: setup
	cargo build --release

train: build
	./target/release/tricks train --config configs/cifar10/resnet20.toml --data $(DATA) --out $(OUT) $(ARGS)

test: setup-test
	TRICKS_REQUIRE_PARITY=1 cargo test --release

bench: build
	bash bench/run.sh

clean:
	cargo clean
