# Two commands a user needs: `make demo` (the main job) and `make test`. Both build the environment
# first (Debian packages espeak-ng, sox, flac; a venv in .venv with pinned torch/fairseq).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: env test demo demo-quick clean

env: $(STAMP)

$(STAMP): setup.py scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m recipes.librispeech.run --size default --workdir exp/default

demo-quick: $(STAMP)
	$(PY) -m recipes.librispeech.run --size quick --workdir exp/quick

clean:
	rm -rf exp
