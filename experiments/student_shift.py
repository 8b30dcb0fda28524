"""Choosing the student's random shifts (``student_shift``) on a validation split, not the test split.

A student distilled on the 2,000 public inputs sees nothing else; shifting its inputs a little,
with the targets the teachers gave the unmoved ones, shows it that small moves keep the class.
How far to move them is chosen here on labelled training-pool images that neither the teacher
nor the student learns from:

* the training pool's images outside the public split (the union of the private partitions) are
  split once, at random (seed fixed), into a **validation** hold-out of ``--validation-size`` and
  the rest;
* one teacher is trained centrally on the rest (the targets an ideal ensemble of the clients'
  teachers would send; ``experiments.transfer_ceiling``);
* for each shift, a fresh student is distilled from it on the public inputs, with the run's
  temperature, epochs and weight average, and scored on the validation hold-out.

The shift with the best validation accuracy is the choice; the test split is scored beside it
only to report. No run of ``fedkd-sim`` reads the private partitions this way: this is an offline
study of the student's recipe.

    python -m experiments.student_shift --dataset fashion_mnist --data-root ../shared/data \
        --num-clients 100 --out results/fd_recipe/student-shift/fashion_mnist-100.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from experiments.setting import add_setting_arguments, setting_config
from experiments.transfer_ceiling import central_teacher, fresh_student, private_union
from fedkd.config import RunConfig
from fedkd.data.local import evaluation_split, public_inputs
from fedkd.distillation import OptimizerSettings, distill, evaluate, predict_logits, soften
from fedkd.seeding import SeedPurpose, torch_generator

SHIFTS = (0.0, 0.025, 0.05, 0.075, 0.1)


def held_out_teacher(
    config: RunConfig, *, architecture: str, epochs: int, validation_size: int
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A teacher trained on the private partitions' union less a random validation hold-out,
    and that hold-out's images and labels."""
    images, labels = private_union(config)
    if not 0 < validation_size < len(images):
        raise ValueError(f"--validation-size must lie in (0, {len(images)}), got {validation_size}.")
    order = torch.randperm(len(images), generator=torch_generator(config.seed, SeedPurpose.VALIDATION_SPLIT))
    validation, rest = order[:validation_size], order[validation_size:]
    teacher = central_teacher(config, architecture=architecture, epochs=epochs, examples=(images[rest], labels[rest]))
    return teacher, images[validation], labels[validation]


def shift_study(
    config: RunConfig,
    *,
    shifts: tuple[float, ...],
    epochs: int,
    teacher_model: str,
    teacher_epochs: int,
    validation_size: int,
) -> dict[str, Any]:
    spec = config.split_spec()
    public, test = public_inputs(spec), evaluation_split(spec)
    teacher, val_images, val_labels = held_out_teacher(
        config, architecture=teacher_model, epochs=teacher_epochs, validation_size=validation_size
    )
    targets = soften(predict_logits(teacher, public.images), config.temperature)
    result: dict[str, Any] = {
        "teacher": {
            "validation_accuracy": evaluate(teacher, val_images, val_labels).accuracy,
            "test_accuracy": evaluate(teacher, test.images, test.labels).accuracy,
        },
        "students": [],
    }
    print(json.dumps(result["teacher"]), flush=True)
    for shift in shifts:
        started = time.perf_counter()
        student = fresh_student(config)
        distill(
            student,
            public.images,
            targets,
            epochs=epochs,
            temperature=config.temperature,
            settings=OptimizerSettings(lr=config.lr, batch_size=config.batch_size),
            generator=torch_generator(config.seed, SeedPurpose.DISTILL),
            max_shift=shift,
            average_decay=config.distill_ema,
        )
        row = {
            "student_shift": shift,
            "validation_accuracy": evaluate(student, val_images, val_labels).accuracy,
            "test_accuracy": evaluate(student, test.images, test.labels).accuracy,
            "seconds": time.perf_counter() - started,
        }
        result["students"].append(row)
        print(json.dumps(row), flush=True)
    best = max(result["students"], key=lambda row: row["validation_accuracy"])
    result["chosen_on_validation"] = best["student_shift"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setting_arguments(parser)
    parser.add_argument("--shifts", type=float, nargs="+", default=list(SHIFTS))
    parser.add_argument("--epochs", type=int, default=100, help="student epochs on the public inputs")
    parser.add_argument("--teacher-model", default="lenet5_bn")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--validation-size", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if min(args.epochs, args.teacher_epochs, args.public_size) < 1:
        parser.error("--epochs, --teacher-epochs and --public-size must be ≥ 1.")
    if any(not 0.0 <= shift < 0.5 for shift in args.shifts):
        parser.error(f"--shifts must lie in [0, 0.5), got {args.shifts}.")
    torch.set_num_threads(args.threads)
    config = setting_config(args)
    result = {"args": vars(args), "temperature": config.temperature, "distill_ema": config.distill_ema}
    result |= shift_study(
        config,
        shifts=tuple(args.shifts),
        epochs=args.epochs,
        teacher_model=args.teacher_model,
        teacher_epochs=args.teacher_epochs,
        validation_size=args.validation_size,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"chosen on validation: student_shift={result['chosen_on_validation']}")


if __name__ == "__main__":
    main()
