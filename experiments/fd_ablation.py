"""One-factor-at-a-time ablation of the federated-distillation recipe around ``fedkd-sim``'s defaults.

Each variant is the default run plus one change; every run is a plain ``fedkd-sim`` run folder
under ``OUT/<variant>`` (finished folders are kept, so a relaunch only runs what is missing),
and ``experiments.fd_ablation_table`` renders the README table from them.

    python -m experiments.fd_ablation --out results/fd_recipe/fashion_mnist-100 -- dataset=fashion_mnist \
        data_root=../shared/data num_clients=100 public_size=2000 teacher_cache=.cache/teachers
    python -m experiments.fd_ablation_table results/fd_recipe/fashion_mnist-100

With ``teacher_cache`` the variants that change only what follows the teachers (aggregator,
temperature, distillation, student, views) reuse the defaults' teachers and take minutes.

Arguments after ``--`` are overrides applied to every variant (the setting).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fedkd.results import iter_run_folders

# name -> the overrides that make it differ from the defaults (the first is the defaults). Every
# variant changes one thing back from the recipe, except "previous defaults", which undoes all
# of the recipe's changes (aggregator, temperature, distillation epochs, shifts (teachers' and the
# student's), weight average,
# 15 rounds, co-distillation, the teachers' architectures) at once.
VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "strategy.aggregator=weighted": ["strategy.aggregator=weighted"],
    "strategy.class_weight_power=1": ["strategy.class_weight_power=1"],
    "temperature=1": ["temperature=1"],
    "distill_epochs=5": ["distill_epochs=5"],
    "augment_shift=0.1": ["augment_shift=0.1"],
    "student_shift=0": ["student_shift=0"],
    "distill_ema=0": ["distill_ema=0"],
    "previous defaults": [
        "strategy.aggregator=weighted",
        "temperature=1",
        "distill_epochs=5",
        "augment_shift=0.1",
        "student_shift=0.1",
        "distill_ema=0",
        "rounds=10",
        "strategy.consensus_weight=0",
        "client_models=[cnn_small,lenet5_bn]",
    ],
    "strategy.consensus_weight=0": ["strategy.consensus_weight=0"],
    "strategy.consensus_lacked_share=0": ["strategy.consensus_lacked_share=0"],
    "client_models=[cnn_small,lenet5_bn]": ["client_models=[cnn_small,lenet5_bn]"],
    "rounds=10": ["rounds=10"],
    "rounds=5": ["rounds=5"],
    "mixup_views=1000": ["mixup_views=1000"],
    "semi_supervised=true": ["semi_supervised=true"],
    "student_model=cnn_medium": ["student_model=cnn_medium"],
    "strategy=fedmd (digest)": ["strategy=fedmd"],
    "strategy=dsfl (digest + ERA)": ["strategy=dsfl", "strategy.aggregator=weighted"],
    "strategy=fedavg (weights)": ["strategy=fedavg"],
}


def folder_name(variant: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "-" for c in variant.split(" (")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder that receives one run folder per variant")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants")
    parser.add_argument("setting", nargs="*", help="overrides for every variant (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    finished = {run.path.name for run in iter_run_folders(out)} if out.exists() else set()
    for variant, overrides in VARIANTS.items():
        if args.only is not None and variant not in args.only:
            continue
        name = folder_name(variant)
        if name in finished:
            print(f"{variant}: finished, kept", flush=True)
            continue
        command = [sys.executable, "-m", "federation.sim", *args.setting, *overrides, f"hydra.run.dir={out / name}"]
        print(" ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
