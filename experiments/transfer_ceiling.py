"""How far the student can get on the public transfer set alone, with ideal targets.

Two ceilings for ``fedkd-sim``'s student on a run's public inputs (the same split and seeds),
neither reachable by a federated run but both bounding what its targets could give:

* ``true_labels``: the student trained on the public inputs with their true labels;
* ``central_teacher``: the student distilled (the run's temperature and weight average) from one
  teacher trained centrally on the union of the private partitions, the targets an ideal
  ensemble of the clients' teachers would send.

If the second ceiling passes a target and the federated student does not, the teachers' ensemble
is what is short, not the transfer set. Test labels are used only to report.

    python -m experiments.transfer_ceiling --dataset fashion_mnist --data-root ../shared/data \
        --num-clients 100 --public-size 2000 --out results/fd_recipe/ceiling/fashion_mnist-100.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from experiments.setting import add_setting_arguments, setting_config
from fedkd.config import RunConfig
from fedkd.data.local import evaluation_split, info_for, private_partition, public_inputs
from fedkd.distillation import (
    OptimizerSettings,
    distill,
    evaluate,
    predict_logits,
    soften,
    train_supervised,
)
from fedkd.models import build_model
from fedkd.seeding import SeedPurpose, derive_seed, torch_generator


def fresh_student(config: RunConfig) -> torch.nn.Module:
    info = info_for(config.split_spec())
    return build_model(
        config.student_model,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        seed=derive_seed(config.seed, SeedPurpose.STUDENT_INIT),
    )


def private_union(config: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of all the run's private partitions together."""
    spec = config.split_spec()
    parts = [private_partition(spec, k) for k in range(config.num_clients)]
    return torch.cat([part.images for part in parts]), torch.cat([part.labels for part in parts])


def central_teacher(
    config: RunConfig,
    *,
    architecture: str,
    epochs: int,
    examples: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """A teacher trained centrally on ``examples`` (images, labels), by default the union of the
    run's private partitions (no public inputs)."""
    images, labels = private_union(config) if examples is None else examples
    info = info_for(config.split_spec())
    teacher = build_model(
        architecture,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        seed=derive_seed(config.seed, SeedPurpose.TEACHER_INIT),
    )
    train_supervised(
        teacher,
        images,
        labels,
        epochs=epochs,
        settings=OptimizerSettings(lr=config.lr, batch_size=64),
        generator=torch_generator(config.seed, SeedPurpose.TEACHER_TRAIN),
        max_shift=config.augment_shift,
    )
    return teacher.eval()


def ceilings(config: RunConfig, *, epochs: int, teacher_model: str, teacher_epochs: int) -> dict[str, Any]:
    spec = config.split_spec()
    public, test = public_inputs(spec), evaluation_split(spec)
    settings = OptimizerSettings(lr=config.lr, batch_size=config.batch_size)
    result: dict[str, Any] = {}

    started = time.perf_counter()
    student = fresh_student(config)
    train_supervised(
        student,
        public.images,
        public.labels,
        epochs=epochs,
        settings=settings,
        generator=torch_generator(config.seed, SeedPurpose.DISTILL),
        max_shift=config.augment_shift,
    )
    result["true_labels"] = evaluate(student, test.images, test.labels).accuracy
    print(json.dumps({"true_labels": result["true_labels"], "seconds": time.perf_counter() - started}), flush=True)

    teacher = central_teacher(config, architecture=teacher_model, epochs=teacher_epochs)
    result["teacher"] = evaluate(teacher, test.images, test.labels).accuracy
    started = time.perf_counter()
    student = fresh_student(config)
    distill(
        student,
        public.images,
        soften(predict_logits(teacher, public.images), config.temperature),
        epochs=epochs,
        temperature=config.temperature,
        settings=settings,
        generator=torch_generator(config.seed, SeedPurpose.DISTILL),
        max_shift=config.augment_shift,
        average_decay=config.distill_ema,
    )
    result["central_teacher"] = evaluate(student, test.images, test.labels).accuracy
    print(json.dumps({"teacher": result["teacher"], "central_teacher": result["central_teacher"]}), flush=True)
    result["seconds"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setting_arguments(parser)
    parser.add_argument("--epochs", type=int, default=100, help="student epochs on the public inputs")
    parser.add_argument("--teacher-model", default="lenet5_bn")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if min(args.epochs, args.teacher_epochs, args.public_size) < 1:
        parser.error("--epochs, --teacher-epochs and --public-size must be ≥ 1.")
    torch.set_num_threads(args.threads)
    config = setting_config(args)
    result = {"args": vars(args), "augment_shift": config.augment_shift, "temperature": config.temperature}
    result |= ceilings(config, epochs=args.epochs, teacher_model=args.teacher_model, teacher_epochs=args.teacher_epochs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
