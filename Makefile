# BrainWavLM, step by step. Two commands for a fresh clone:
#   make demo   # the whole study on the simulated default, stage by stage
#   make test   # the test suite
# One target per stage, so you can rerun the stage you changed: make 01, make 02, ...
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= data
RESULTS ?= results
CHECKPOINTS ?= checkpoints
SUBJ ?= sim01
# The demo's fine-tuning settings for the pretrained tiny WavLM (models/pretrain_tiny.py) on the
# simulated study: the paper's LoRA (rank 4, alpha 4 on q/k/v, the script's defaults) with learning
# rates 30x / 10x the paper's, because the study gives about 9 steps per epoch where the paper had
# thousands: at the paper's 1e-4 the gain over 3 seeds was -0.0001 (README, bench/RESULTS.md).
# Training stops 3 epochs after the best validation r (--patience 3). The demo caps it at 12 epochs
# to stay within its 10-minute budget (8 min 16 s, bench/RESULTS.md): most runs still improve at 12
# (stage 03 says which); trained until they stop (bench/claims.sh, up to 20) they gain more.
LORA := --lr-adapter 3e-3 --lr-readout 1e-3 --epochs 12 --patience 3
FULL := --full-finetune --lr-adapter 1e-3 --lr-readout 1e-3 --epochs 12 --patience 3
STAGE_ARGS := --data $(DATA) --results $(RESULTS)

.PHONY: demo test 01 02 03 04 05 claims stability joint clean gpu-wheel figures fetch pycortex quick viewer

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# pycortex builds from source (Cython, a C compiler); the demo runs without it (assets/s1_cortex.npz)
$(VENV)/.pycortex: $(VENV)/.installed requirements-pycortex.txt
	$(PY) -m pip install -q cython setuptools-scm wheel
	$(PY) -m pip install -q --no-build-isolation -r requirements-pycortex.txt
	touch $@

pycortex: $(VENV)/.pycortex

demo: 01 02 03 04 05 claims

01: $(VENV)/.installed
	$(PY) 01_prepare_data.py --data $(DATA)

02: $(VENV)/.installed
	$(PY) 02_baseline_ridge.py $(STAGE_ARGS)

# whole-cortex LoRA for every subject (3 seeds for $(SUBJ)) and AC LoRA for $(SUBJ), started from its
# whole-cortex run of seed 0 as the paper's claim 2 reads (AC won back, the gains elsewhere kept). The three seeds
# of full fine-tuning (the stability comparison of claim 1) are `make stability`: 3 more minutes,
# which the demo's 10-minute budget does not hold (bench/RESULTS.md)
03: $(VENV)/.installed
	$(PY) 03_finetune_lora.py $(STAGE_ARGS) --checkpoints $(CHECKPOINTS) --subject $(SUBJ) --seeds 0 1 2 $(LORA)
	$(PY) 03_finetune_lora.py $(STAGE_ARGS) --checkpoints $(CHECKPOINTS) \
		--subject $$($(PY) -c "from lib.study import load_study; print(' '.join(s for s in load_study('$(DATA)')['subjects'] if s != '$(SUBJ)'))") $(LORA)
	$(PY) 03_finetune_lora.py $(STAGE_ARGS) --checkpoints $(CHECKPOINTS) --subject $(SUBJ) --roi AC --init-from whole $(LORA)

# the demo's last step: the paper's claims checked on its results (results/claims.md)
claims: $(VENV)/.installed
	$(PY) claims.py $(RESULTS) --data $(DATA)

# claim 1's comparison after make demo: compare.py prints the two groups' spreads across seeds
stability: $(VENV)/.installed
	$(PY) 03_finetune_lora.py $(STAGE_ARGS) --checkpoints $(CHECKPOINTS) --subject $(SUBJ) --seeds 0 1 2 $(FULL)
	$(PY) compare.py $(RESULTS)
	$(PY) claims.py $(RESULTS) --data $(DATA)

# beyond the paper, after make demo (README, "Beyond the paper"; about 25 minutes here): one model
# tuned on several brains. Seeds 1 and 2 of the single-subject runs make demo has not run, then for
# seeds 0-2 joint LoRA on every subject and on each group that leaves one out, stage 04 with the
# data-efficiency curves, and bench/joint_summary.py over the seeds
SUBJECTS = $$($(PY) -c "from lib.study import load_study; print(' '.join(load_study('$(DATA)')['subjects']))")
joint: $(VENV)/.installed
	$(PY) 03_finetune_lora.py $(STAGE_ARGS) --checkpoints $(CHECKPOINTS) --seeds 1 2 $(LORA) \
		--subject $$(for s in $(SUBJECTS); do [ $$s != $(SUBJ) ] && echo $$s; done)
	for seed in 0 1 2; do \
		$(PY) 03_finetune_lora.py $(STAGE_ARGS) --checkpoints $(CHECKPOINTS) --seed $$seed $(LORA) --joint \
			--subject $(SUBJECTS) || exit 1; \
		for out in $(SUBJECTS); do \
			$(PY) 03_finetune_lora.py $(STAGE_ARGS) --checkpoints $(CHECKPOINTS) --seed $$seed $(LORA) --joint \
				--subject $$(for s in $(SUBJECTS); do [ $$s != $$out ] && echo $$s; done) || exit 1; \
		done; \
		$(PY) 04_cross_subject.py $(STAGE_ARGS) --checkpoints $(CHECKPOINTS) --seed $$seed --data-efficiency || exit 1; \
	done
	$(PY) bench/joint_summary.py $(RESULTS)

04: $(VENV)/.installed
	$(PY) 04_cross_subject.py $(STAGE_ARGS) --checkpoints $(CHECKPOINTS)

05: $(VENV)/.installed
	$(PY) 05_linear_probes.py $(STAGE_ARGS) --checkpoints $(CHECKPOINTS) --subject $(SUBJ) --init-from whole

# The student's loop: change a stage, then `make quick EXP=mine`: stages 01-05 into experiments/$(EXP)/
# with the demo's settings, tuning sim01 with one seed, then compare.py against the demo's results.
# Stages 01 and 02 are linked from the demo's data/ and results/ when their code, inputs and flags
# are the demo's (--reuse: a stage 03 edit costs stage 03 and after); else they run.
# Any stage's flags pass through: make quick EXP=mse ARGS03="--loss mse" (ARGS01 ... ARGS05).
EXP ?= quick
SEED ?= 0
QUICK := experiments/$(EXP)
QUICK_ARGS := --data $(QUICK)/data --results $(QUICK)/results
quick: $(VENV)/.installed
	$(PY) 01_prepare_data.py --data $(QUICK)/data --reuse $(DATA) $(ARGS01)
	if [ -d $(DATA)/features ] && [ ! -d $(QUICK)/data/features ]; then cp -r $(DATA)/features $(QUICK)/data/; fi
	$(PY) 02_baseline_ridge.py $(QUICK_ARGS) --reuse $(RESULTS) $(ARGS02)
	$(PY) 03_finetune_lora.py $(QUICK_ARGS) --checkpoints $(QUICK)/checkpoints --subject sim01 --seed $(SEED) $(LORA) $(ARGS03)
	$(PY) 04_cross_subject.py $(QUICK_ARGS) --checkpoints $(QUICK)/checkpoints --tuned-on sim01 --seed $(SEED) $(ARGS04)
	$(PY) 05_linear_probes.py $(QUICK_ARGS) --checkpoints $(QUICK)/checkpoints --seed $(SEED) --models baseline whole $(ARGS05)
	if [ -d $(RESULTS) ]; then $(PY) compare.py $(RESULTS) $(QUICK)/results --out $(QUICK)/results/compare.png; fi

# two pytest-xdist workers, each taking whole files, the longest first (tests/conftest.py says why)
# (pycortex writes its user config on first import: once here, not by both workers at once)
test: $(VENV)/.installed $(VENV)/.pycortex
	-$(PY) -c "import cortex" > /dev/null 2>&1
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

# every result on the brain, after make demo: pycortex's WebGL viewer in $(RESULTS)/viewer/ (viewer.py),
# opened by the serve line it prints (python -m http.server ... --bind 127.0.0.1)
viewer: $(VENV)/.pycortex
	$(PY) viewer.py --data $(DATA) --results $(RESULTS)

# the README's figures, from the last demo run
# (the demo's runs carry the tag of its LORA settings in their names: one match each after make demo)
figures:
	mkdir -p figures
	cp $(RESULTS)/02_baseline.png $(RESULTS)/02_flatmaps.png figures/
	cp $(wildcard $(RESULTS)/03_$(SUBJ)_whole_lora_seed0_??????.png) figures/03_whole_lora.png
	cp $(wildcard $(RESULTS)/03_$(SUBJ)_AC_lora_seed0_??????_from_*.png) figures/03_AC_lora.png
	cp $(wildcard $(RESULTS)/04_cross_subject_??????.png) figures/04_cross_subject.png
	cp $(wildcard $(RESULTS)/05_probes_??????_from_whole.png) figures/05_probes.png

clean:
	rm -rf $(DATA) $(RESULTS) $(CHECKPOINTS) experiments

# real data: the files of OpenNeuro ds003020 the stages read (about 78 GB for UTS01-UTS03), with
# openneuro-py (installed here, not by make demo; 2026.4.0 is the first release on OpenNeuro's current
# API, and an older copy is upgraded). Snapshot 3.1.0, the one assets/ds003020_files.tsv lists.
# Rerun to continue an interrupted fetch.
#   make fetch DS=/data/ds003020 [FETCH_ARGS="--subjects UTS01 --dry-run"]
DS ?= ds003020
fetch: $(VENV)/.installed
	$(PY) -m pip install -q --upgrade "openneuro-py>=2026.4.0"
	$(PY) 00_fetch_ds003020.py --dest $(DS) $(FETCH_ARGS)

# the espeakng-loader wheel bench/gpu_check.sh installs on a GPU machine without network
gpu-wheel: $(VENV)/.installed
	$(PY) -m pip download -q --no-deps -d bench/wheels "espeakng-loader>=0.2.4,<0.3"
