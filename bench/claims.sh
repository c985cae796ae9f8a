#!/usr/bin/env bash
# The runs behind bench/RESULTS.md's claims table, for one model, into DATA and RESULTS folders:
#   bench/claims.sh tiny-pretrained data_claims results_claims_pretrained [checkpoints folder]
#   bench/claims.sh tiny data_claims results_claims_random
# Then: .venv/bin/python bench/claims_table.py RESULTS
# The LORA and FULL settings are the Makefile's (make demo's) with up to 20 epochs instead of the
# demo's 12: every run stops by patience, 3 epochs after its best; the study is stage 01's default.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1 D=$2 R=$3 C=${4:-$3/checkpoints}
P=${PYTHON:-.venv/bin/python}
LORA=$(make -s -f - print-lora <<<'include Makefile
print-lora: ; @echo $(LORA)')
FULL=$(make -s -f - print-full <<<'include Makefile
print-full: ; @echo $(FULL)')
LORA="$LORA --epochs 20" FULL="$FULL --epochs 20"
IO="--data $D --results $R --checkpoints $C"
[ -f "$D/study.npz" ] || $P 01_prepare_data.py --data "$D"
$P 02_baseline_ridge.py --data "$D" --results "$R" --model "$MODEL"
$P 03_finetune_lora.py $IO --subject sim01 --seeds 0 1 2 $LORA
$P 03_finetune_lora.py $IO --subject sim02 sim03 $LORA
$P 03_finetune_lora.py $IO --subject sim01 --seeds 0 1 2 --roi AC $LORA
$P 03_finetune_lora.py $IO --subject sim01 --seeds 0 1 2 --roi AC --init-from whole $LORA
$P 03_finetune_lora.py $IO --subject sim01 --seeds 0 1 2 $FULL
$P 04_cross_subject.py $IO
$P 05_linear_probes.py $IO --subject sim01
