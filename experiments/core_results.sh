#!/usr/bin/env bash
# Reruns the README's core comparison: FD student vs FedAvg vs the same student trained
# centrally, 100 clients, Dirichlet alpha=0.5, 5 rounds, seed 0, on MNIST and Fashion-MNIST.
# Usage: bash experiments/core_results.sh [DATA_ROOT] [OUT]
set -euo pipefail
set -f  # the overrides below hold [lists], not file patterns
DATA_ROOT=${1:-../shared/data}
OUT=${2:-results/core}
# The table was measured with the student settings of the previous defaults (README), pinned here.
PREVIOUS_RECIPE="strategy.aggregator=weighted temperature=1 distill_epochs=5 augment_shift=0.1 student_shift=0.1 distill_ema=0 strategy.consensus_weight=0 client_models=[cnn_small,lenet5_bn]"
COMMON="num_clients=100 partition=dirichlet partition.alpha=0.5 rounds=5 public_size=2000 seed=0 $PREVIOUS_RECIPE"
for DATASET in mnist fashion_mnist; do
  fedkd-sim dataset=$DATASET data_root=$DATA_ROOT $COMMON hydra.run.dir=$OUT/$DATASET-fd
  fedkd-sim dataset=$DATASET data_root=$DATA_ROOT $COMMON strategy=fedavg hydra.run.dir=$OUT/$DATASET-fedavg
  python -m experiments.centralized --dataset $DATASET --data-root $DATA_ROOT --num-clients 100 \
    --public-size 2000 --epochs 5 --seed 0 --out $OUT/$DATASET-central
done
python -m experiments.core_table $OUT | tee $OUT/table.md
