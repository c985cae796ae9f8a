#!/usr/bin/env bash
# This repository's recipe beside the authors' (docs/methods.md, "Beside the authors' code"), on the
# simulated study, into one results folder (runs of both recipes side by side), then each of the
# authors' choices alone:
#   bench/recipes.sh DATA RESULTS            # DATA: a study of stage 01's defaults (built if absent)
#   .venv/bin/python bench/recipes_table.py RESULTS --data DATA
# Both recipes run make demo's runs (3 seeds of whole-cortex LoRA on sim01, one on sim02 and sim03,
# the AC run started from sim01's whole-cortex run), stages 04 and 05 and claims.py, with the
# Makefile's learning rates, trained until validation stops (up to 20 epochs, patience 3, as
# bench/claims.sh). Each choice alone: one seed of whole-cortex LoRA on sim01 with that one flag
# (a stage 02 choice: stage 02 with it, in a results folder of its own, then that run). The
# authors' recipe runs beside the rest, each process on one thread. Every command's wall and CPU
# seconds go to RESULTS/times.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
D=$1 R=$2 C=${3:-$2/checkpoints}
P=${PYTHON:-.venv/bin/python}
LORA="--lr-adapter 3e-3 --lr-readout 1e-3 --epochs 20 --patience 3"
mkdir -p "$R"
timed() {  # name, then the command: its wall and CPU (user + system) seconds into times.tsv
  local name=$1 me=$BASHPID; shift  # this shell's own: $BASHPID inside $(...) would be the subshell's
  local t0 c0 t1 c1
  t0=$(date +%s.%N); c0=$(awk '{print $14 + $15 + $16 + $17}' /proc/$me/stat)
  "$@"
  t1=$(date +%s.%N); c1=$(awk '{print $14 + $15 + $16 + $17}' /proc/$me/stat)
  printf '%s\t%.1f\t%.1f\n' "$name" "$(echo "$t1 - $t0" | bc)" "$(echo "($c1 - $c0) / $(getconf CLK_TCK)" | bc -l)" >> "$R/times.tsv"
}
IO="--data $D --results $R --checkpoints $C --threads 1"
[ -f "$D/study.npz" ] || $P 01_prepare_data.py --data "$D"
recipe() {  # make demo's runs, stages 04-05 and claims.py under one recipe
  local recipe=$1
  timed "02 $recipe" $P 02_baseline_ridge.py --data "$D" --results "$R" --threads 1 --recipe $recipe
  timed "03 $recipe sim01 seeds 0 1 2" $P 03_finetune_lora.py $IO --recipe $recipe --subject sim01 --seeds 0 1 2 $LORA
  timed "03 $recipe sim02 sim03" $P 03_finetune_lora.py $IO --recipe $recipe --subject sim02 sim03 $LORA
  timed "03 $recipe sim01 AC from whole" $P 03_finetune_lora.py $IO --recipe $recipe --subject sim01 --roi AC \
    --init-from whole $LORA
  timed "04 $recipe" $P 04_cross_subject.py $IO --recipe $recipe
  timed "05 $recipe" $P 05_linear_probes.py $IO --recipe $recipe --subject sim01 --init-from whole
  $P claims.py "$R" --data "$D" --recipe $recipe
}
alone() {  # each of the authors' stage 03 choices alone (name, then its flags), against repo's seed 0
  local name=$1; shift
  timed "03 alone $name" $P 03_finetune_lora.py $IO --subject sim01 --seed 0 $LORA "$@"
}
alone02() {  # each stage 02 choice alone: its own results folder (stage 02 with it, then the run)
  local name=$1; shift
  local r="$R/alone02_$name"
  mkdir -p "$r"
  timed "02 alone $name" $P 02_baseline_ridge.py --data "$D" --results "$r" --threads 1 "$@"
  timed "03 alone02 $name" $P 03_finetune_lora.py --data "$D" --results "$r" --checkpoints "$r/checkpoints" \
    --threads 1 --subject sim01 --seed 0 $LORA
}
# two lanes of one thread each (the tiny model keeps two cores busier so than one process of two)
recipe authors > "$R/lane_authors.log" 2>&1 &
lane=$!
recipe repo
alone train-windows --train-context-s 3.75 --train-stride-s 0.25 --train-window-feature first
alone lanczos-floor --lanczos-floor 1e-10
alone blocks --block-trs 10 --batch-blocks 1
alone block-history --block-history zeros
alone norm --norm instance
alone block-order --block-order stories
alone best-epoch --best-epoch linearized
alone epochs --patience 20
alone lora-dropout --lora-dropout 0
alone readout-init --readout-init xavier
alone grad-clip --grad-clip inf
alone layer --layer 2  # the analogue of their fixed layer 9 of 12: one below stage 02's best
alone layerdrop --layerdrop 0.1
alone mask-time-prob --mask-time-prob 0.05
alone02 windows --window-feature first --context-s 3.75 --stride-s 0.25
alone02 ridge --ridge bootstrap --alphas $($P -c "import numpy as np; print(*np.logspace(2, 8, 10))")
alone02 fit-stories --fit-stories train
alone02 story-start --story-start zeros
wait $lane
