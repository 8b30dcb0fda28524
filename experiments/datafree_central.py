"""Centralized data-free distillation: one teacher, one student, no federation, no real inputs.

Validates the synthesizers against the literature (DAFL 98.2 %, DFAD 98.3 % on MNIST with a
LeNet-5 teacher and a LeNet-5-half student). The teacher trains on the whole training split;
the student then learns only from synthesized inputs labelled by the teacher's soft labels,
and is evaluated on the test split after every distillation epoch. With the amortized
generator each epoch draws a fresh synthetic set (a forward pass), as DAFL does; DeepInversion
optimizes one set and reuses it. Writes a run folder (config.yaml, metrics.jsonl)
plus ``samples.png``, a grid of synthesized inputs per class.

    python -m experiments.datafree_central --dataset mnist --data-root ../shared/data \
        --method generator --seed 0 --out results/datafree/central-mnist
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedkd.config import RunConfig
from fedkd.data import load_dataset, to_tensor, to_uint8
from fedkd.distillation import OptimizerSettings, distill, evaluate, predict_logits, soften, train_supervised
from fedkd.models import build_model, count_parameters
from fedkd.results import RunFolder
from fedkd.seeding import SeedPurpose, derive_seed, torch_generator
from generators.image_grid import save_class_grid
from generators.registry import SYNTHESIZERS, build_synthesizer

CLASS_NAMES = {
    "fashion_mnist": ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"),
}


def class_names(dataset: str, num_classes: int) -> tuple[str, ...]:
    return CLASS_NAMES.get(dataset, tuple(str(label) for label in range(num_classes)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--teacher", default="lenet5_bn")
    parser.add_argument("--student", default="lenet5_half")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--method", choices=SYNTHESIZERS, default="generator")
    parser.add_argument("--num-synthetic", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=1000, help="generator steps / DeepInversion iterations")
    parser.add_argument("--distill-epochs", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--resample",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generator only: draw a fresh synthetic set every epoch (one forward pass each)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.num_synthetic < 1 or args.distill_epochs < 1 or args.teacher_epochs < 1:
        parser.error("--num-synthetic, --distill-epochs and --teacher-epochs must be ≥ 1.")

    torch.manual_seed(args.seed)
    dataset = load_dataset(args.dataset, data_root=args.data_root or None)
    info = dataset.info
    train_images = to_tensor(dataset.train.images, info)
    train_labels = torch.from_numpy(dataset.train.labels.astype(np.int64))
    test_images = to_tensor(dataset.test.images, info)
    test_labels = torch.from_numpy(dataset.test.labels.astype(np.int64))
    settings = OptimizerSettings(lr=1e-3, batch_size=64)

    teacher = build_model(
        args.teacher,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        seed=derive_seed(args.seed, SeedPurpose.TEACHER_INIT),
    )
    started = time.perf_counter()
    train_supervised(
        teacher,
        train_images,
        train_labels,
        epochs=args.teacher_epochs,
        settings=settings,
        generator=torch_generator(args.seed, SeedPurpose.TEACHER_TRAIN),
        max_shift=0.1,
    )
    teacher_accuracy = evaluate(teacher, test_images, test_labels).accuracy
    print(
        f"teacher {args.teacher} ({count_parameters(teacher):,} params): accuracy {teacher_accuracy:.4f} "
        f"after {args.teacher_epochs} epochs, {time.perf_counter() - started:.0f} s",
        flush=True,
    )

    synthesizer = build_synthesizer(
        args.method,
        teacher,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        steps=args.steps,
        pixel_mean=info.mean,
        pixel_std=info.std,
    )
    started = time.perf_counter()
    synthetic, targets = synthesizer.sample(
        args.num_synthetic, generator=torch_generator(args.seed, SeedPurpose.SYNTHESIS)
    )
    # The student sees the inputs as they would cross the wire: 8-bit pixels.
    pixels = to_uint8(synthetic, info)
    synthetic = to_tensor(pixels, info)
    synthesis_seconds = time.perf_counter() - started
    soft_labels = soften(predict_logits(teacher, synthetic), args.temperature)
    agreement = float((soft_labels.argmax(1) == targets).float().mean())
    print(
        f"{args.method}: {args.num_synthetic} inputs in {synthesis_seconds:.1f} s "
        f"({args.num_synthetic / synthesis_seconds:.0f} inputs/s); the teacher assigns "
        f"{agreement:.1%} of them to the class they were synthesized for",
        flush=True,
    )

    resample = args.resample and args.method == "generator"
    out = Path(args.out)
    folder = RunFolder(out)
    config = RunConfig(dataset=args.dataset, data_root=args.data_root, seed=args.seed, student_model=args.student)
    extra = {
        "method": f"data-free centralized ({args.method})",
        "teacher": args.teacher,
        "teacher_epochs": args.teacher_epochs,
        "teacher_accuracy": teacher_accuracy,
        "num_synthetic": args.num_synthetic,
        "synthesis_steps": args.steps,
        "synthesis_seconds": synthesis_seconds,
        "distill_epochs": args.distill_epochs,
        "resample_every_epoch": resample,
    }
    folder.write_config(config, extra=extra)
    folder.start_metrics()
    save_class_grid(
        pixels,
        targets.numpy(),
        out / "samples.png",
        class_names=class_names(args.dataset, info.num_classes),
        title=f"{args.dataset}: {args.method}, {args.teacher} teacher",
    )

    student = build_model(
        args.student,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        seed=derive_seed(args.seed, SeedPurpose.STUDENT_INIT),
    )
    optimizer = torch.optim.Adam(student.parameters(), lr=settings.lr)
    for epoch in range(1, args.distill_epochs + 1):
        started = time.perf_counter()
        if resample and epoch > 1:
            fresh, _ = synthesizer.sample(
                args.num_synthetic, generator=torch_generator(args.seed, epoch, SeedPurpose.SYNTHESIS)
            )
            synthetic = to_tensor(to_uint8(fresh, info), info)
            soft_labels = soften(predict_logits(teacher, synthetic), args.temperature)
        loss = distill(
            student,
            synthetic,
            soft_labels,
            epochs=1,
            temperature=args.temperature,
            settings=settings,
            generator=torch_generator(args.seed, epoch, SeedPurpose.DISTILL),
            max_shift=0.1,
            optimizer=optimizer,
        )
        result = evaluate(student, test_images, test_labels)
        row = {
            "round": epoch,
            "student_accuracy": result.accuracy,
            "student_loss": result.loss,
            "distill_loss": loss,
            "clients": 0,
            "bytes_up": 0,
            "bytes_down": 0,
            "wall_seconds": time.perf_counter() - started,
        }
        folder.append_metrics(row)
        print(f"epoch {epoch}/{args.distill_epochs}  student accuracy {result.accuracy:.4f}", flush=True)
    summary = {
        "teacher_accuracy": teacher_accuracy,
        "student_accuracy": result.accuracy,
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(student),
        **extra,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"data-free student {args.student}: {result.accuracy:.4f} (teacher {teacher_accuracy:.4f}); results in {out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
