"""Cost of keeping a client's teacher between rounds in Flower's ``context.state``.

Each round a client restores its teacher from an ArrayRecord and stores it back. This script
times that round trip against the client's own local training on the same run, and prints the
ratio, so the number does not depend on how fast or busy the machine is.

    python benchmarks/teacher_persistence.py [--dataset digits] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from flwr.app import ArrayRecord

from fedkd.config import RunConfig
from fedkd.data.local import info_for, private_partition
from fedkd.distillation import OptimizerSettings, train_supervised
from fedkd.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = RunConfig(dataset=args.dataset, data_root=args.data_root)
    spec = config.split_spec()
    info = info_for(spec)
    partition = private_partition(spec, 1)
    for name in config.teacher_models:
        teacher = build_model(name, input_shape=info.input_shape, num_classes=info.num_classes, seed=0)
        started = time.perf_counter()
        for _ in range(args.repeats):
            record = ArrayRecord(teacher.state_dict())
            teacher.load_state_dict(record.to_torch_state_dict())
        persist = (time.perf_counter() - started) / args.repeats
        started = time.perf_counter()
        train_supervised(
            teacher,
            partition.images,
            partition.labels,
            epochs=config.local_epochs,
            settings=OptimizerSettings(lr=config.lr, batch_size=config.batch_size),
            generator=torch.Generator().manual_seed(0),
        )
        train = time.perf_counter() - started
        size = sum(len(array.data) for array in ArrayRecord(teacher.state_dict()).values())
        print(
            f"{name}: state {size / 1000:.1f} KB, store+restore {persist * 1000:.2f} ms, "
            f"local training ({len(partition)} examples × {config.local_epochs} epochs) {train * 1000:.0f} ms, "
            f"ratio {persist / train:.4f}"
        )


if __name__ == "__main__":
    main()
