# Two commands a user needs: `make demo` (the main job) and `make test`. Both build the environment
# first (Debian packages espeak-ng, flite, festival with three voices, sox, flac; a venv in .venv with pinned
# torch/fairseq).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: env test demo demo-quick benchmark reference reference-more reference-narrow clean

env: $(STAMP)

$(STAMP): setup.py scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# from the shipped reference model: the essential rows (baselines, QAT, search, export), test WER with intervals
# (at most 30 min on 2 cores)
demo: $(STAMP)
	$(PY) -m recipes.librispeech.run --size default --workdir exp/default

demo-quick: $(STAMP)
	$(PY) -m recipes.librispeech.run --size quick --workdir exp/quick

# every row on 40-speaker dev and test sets (the demo's corpus with 30 new voices added to each evaluation subset),
# and the per-layer sensitivity of the reference model at 2 bits
benchmark: $(STAMP)
	$(PY) -m recipes.librispeech.run --size benchmark --workdir exp/benchmark
	$(PY) scripts/sensitivity.py --checkpoint recipes/librispeech/reference/model.pt --data exp/benchmark/data \
		--subset dev-clean --bits 2 --out exp/benchmark/sensitivity

# retrain the shipped reference model from scratch on the multi-synthesizer corpus (resumable; about 3 hours on 2
# cores): 1.9 h from random weights (inverse square root schedule, lr 3e-3), bundled, then 9,000 more updates from
# that bundle's weights (fresh optimizer, lr 1e-3 decaying linearly, the average of the last 4 interval checkpoints)
reference: $(STAMP)
	$(PY) -m recipes.librispeech.train_reference --workdir exp/reference --stages corpus,prepare,train,average,bundle \
		--hours 1.9 --average 0 --bundle exp/reference/phase1
	$(PY) -m recipes.librispeech.train_reference --workdir exp/reference/more --init-from exp/reference/phase1 \
		--schedule linear --lr 1e-3 --warmup 500 --max-update 9000 --hours 1.45 --average 4 \
		--bundle exp/reference/bundle

# train the shipped reference model further on its multi-synthesizer corpus (12,000 more updates, about 1.6 h on 2
# cores): from its weights with a fresh optimizer, linear learning-rate decay; resumable; then bundle it
# (exp/reference-more/bundle)
reference-more: $(STAMP)
	$(PY) -m recipes.librispeech.train_reference --workdir exp/reference-more --init-from recipes/librispeech/reference \
		--schedule linear --lr 1e-3 --warmup 500 --max-update 12000 --hours 2.1 --average 4 \
		--bundle exp/reference-more/bundle

# the size-matched fp32 comparison (the benchmark's fp32-narrow row): the reference recipe's two phases, with the same
# updates, on the same corpus with vggtransformer_narrow_ctc (189 k parameters, 0.76 MB in fp32: the bytes of the
# 2-bit reference); resumable; about 1.5 h on 2 cores; bundled into recipes/librispeech/reference-narrow
reference-narrow: $(STAMP)
	$(PY) -m recipes.librispeech.train_reference --workdir exp/reference-narrow --arch vggtransformer_narrow_ctc \
		--stages corpus,prepare,train,average,bundle --hours 10 --max-update 12345 --average 0 \
		--bundle exp/reference-narrow/phase1
	mkdir -p exp/reference-narrow/more && ln -sfn ../corpus exp/reference-narrow/more/corpus
	$(PY) -m recipes.librispeech.train_reference --workdir exp/reference-narrow/more --arch vggtransformer_narrow_ctc \
		--init-from exp/reference-narrow/phase1 --schedule linear --lr 1e-3 --warmup 500 --max-update 9000 \
		--hours 10 --average 4 --bundle recipes/librispeech/reference-narrow

clean:
	rm -rf exp
