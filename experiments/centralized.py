"""Upper reference: the student architecture trained centrally on all the clients' data.

Uses exactly the federated split of the same config (the union of the private partitions,
without the public transfer set) and writes a run folder like ``fedkd-sim`` does, one row per
epoch, so the results script reads both the same way.

    python -m experiments.centralized --dataset mnist --data-root ../shared/data \
        --num-clients 100 --public-size 2000 --epochs 5 --seed 0 --out results/core/mnist-central
"""

from __future__ import annotations

import argparse
import time

import torch

from experiments.setting import add_setting_arguments, setting_config
from fedkd.data.local import evaluation_split, info_for, private_partition
from fedkd.distillation import OptimizerSettings, evaluate, train_supervised
from fedkd.models import build_model
from fedkd.results import RunFolder
from fedkd.seeding import SeedPurpose, derive_seed, torch_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setting_arguments(parser, public_size=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    config = setting_config(args)
    spec = config.split_spec()
    info = info_for(spec)
    parts = [private_partition(spec, k) for k in range(config.num_clients)]
    images = torch.cat([part.images for part in parts])
    labels = torch.cat([part.labels for part in parts])
    test = evaluation_split(spec)
    model = build_model(
        config.student_model,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        seed=derive_seed(config.seed, SeedPurpose.STUDENT_INIT),
    )
    folder = RunFolder(args.out)
    folder.write_config(config, extra={"method": "centralized", "epochs": args.epochs})
    folder.start_metrics()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    print(f"centralized {config.student_model} on {len(labels)} examples of {config.dataset}", flush=True)
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        train_supervised(
            model,
            images,
            labels,
            epochs=1,
            settings=OptimizerSettings(lr=config.lr, batch_size=config.batch_size),
            generator=torch_generator(config.seed, epoch, SeedPurpose.TEACHER_TRAIN),
            max_shift=config.augment_shift,
            optimizer=optimizer,
        )
        result = evaluate(model, test.images, test.labels)
        row = {
            "round": epoch,
            "student_accuracy": result.accuracy,
            "student_loss": result.loss,
            "clients": 0,
            "bytes_up": 0,
            "bytes_down": 0,
            "wall_seconds": time.perf_counter() - started,
        }
        folder.append_metrics(row)
        print(f"epoch {epoch}/{args.epochs}  acc {result.accuracy:.4f}  {row['wall_seconds']:.1f} s", flush=True)
    folder.save_student(model.state_dict(), architecture=config.student_model, server_round=args.epochs)


if __name__ == "__main__":
    main()
