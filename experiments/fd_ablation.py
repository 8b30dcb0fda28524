"""One-factor-at-a-time ablation of the federated-distillation recipe around ``fedkd-sim``'s defaults.

Each variant is the default run plus one change; every run is a plain ``fedkd-sim`` run folder
under ``OUT/<variant>`` (finished folders are kept, so a relaunch only runs what is missing),
and ``experiments.fd_ablation_table`` renders the README table from them.

    python -m experiments.fd_ablation --out results/fd_recipe/digits -- rounds=5  # the default job, 5 rounds
    python -m experiments.fd_ablation --out results/fd_recipe/fmnist20 -- dataset=fashion_mnist \
        data_root=../shared/data num_clients=20 public_size=2000              # any other setting
    python -m experiments.fd_ablation_table results/fd_recipe/digits

Arguments after ``--`` are overrides applied to every variant (the setting).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fedkd.results import iter_run_folders

# name -> the overrides that make it differ from the defaults (the first is the defaults).
VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "rounds=10": ["rounds=10"],
    "local_epochs=6": ["local_epochs=6"],
    "distill_epochs=10": ["distill_epochs=10"],
    "temperature=3": ["temperature=3"],
    "aggregator=entropy_weighted": ["strategy.aggregator=entropy_weighted"],
    "strategy=dsfl (digest + ERA)": ["strategy=dsfl"],
    "strategy=fedmd (digest, weighted)": ["strategy=fedmd", "strategy.aggregator=weighted"],
    "student_model=cnn_medium": ["student_model=cnn_medium"],
    "augment_shift=0": ["augment_shift=0"],
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
