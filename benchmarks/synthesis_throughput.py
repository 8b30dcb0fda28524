"""Synthesis throughput: DeepInversion (per-batch pixel optimization) vs the adversarially trained generator.

Both synthesizers invert the same trained LeNet-5 teacher, in the same process, one thread.

* **DeepInversion** optimizes every batch of pixels from scratch for ``--di-iterations`` Adam
  steps (2,000, the per-batch count of DeepInversion's published code for CIFAR-10 and its
  2k ImageNet setting). Its images per second are all it costs.
* **The generator** of :mod:`generators.adversarial` is first trained for
  ``--generator-iterations`` iterations of the generator–student game (timed separately), then
  synthesizes ``--num-images`` inputs by forward pass.

Times are CPU seconds of this process (``time.process_time``, one torch thread), so that other
jobs on a shared machine do not enter the ratio; wall seconds are stored beside them.

The last line reports ``speedup`` = generator images/s once trained ÷ DeepInversion images/s
(the synthesis throughput), and ``speedup_with_training``, where the generator's training time
is charged to these ``--num-images`` images as if they were the only ones it ever made.

    python benchmarks/synthesis_throughput.py --dataset mnist --data-root ../shared/data \
        --num-images 1000 --repeats 1 --out results/datafree/throughput-1000.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fedkd.data import load_dataset, to_tensor
from fedkd.distillation import OptimizerSettings, train_supervised
from fedkd.models import build_model
from generators.adversarial import AdversarialConfig, AdversarialDistillation
from generators.deepinversion import DeepInversion, InversionConfig

# DeepInversion's published per-batch iteration count (NVlabs/DeepInversion: 2k iterations for
# CIFAR-10 and the 2k ImageNet setting).
PUBLISHED_DI_ITERATIONS = 2000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--teacher", default="lenet5_bn")
    parser.add_argument("--student", default="lenet5_half")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--di-iterations", type=int, default=PUBLISHED_DI_ITERATIONS)
    parser.add_argument("--generator-iterations", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (simulated clients use 1)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if min(args.num_images, args.di_iterations, args.generator_iterations, args.repeats) < 1:
        parser.error("--num-images, --di-iterations, --generator-iterations and --repeats must be ≥ 1.")
    torch.set_num_threads(args.threads)

    dataset = load_dataset(args.dataset, data_root=args.data_root or None)
    info = dataset.info
    count = min(len(dataset.train.labels), 12000)
    teacher = build_model(args.teacher, input_shape=info.input_shape, num_classes=info.num_classes, seed=0)
    train_supervised(
        teacher,
        to_tensor(dataset.train.images[:count], info),
        torch.from_numpy(dataset.train.labels[:count].astype(np.int64)),
        epochs=1,
        settings=OptimizerSettings(lr=1e-3, batch_size=64),
        generator=torch.Generator().manual_seed(0),
    )
    teacher.eval()
    normalization = dict(pixel_mean=tuple(info.mean), pixel_std=tuple(info.std))
    seconds: dict[str, list[float]] = {"deepinversion": [], "generator_training": [], "generator_sampling": []}
    wall: dict[str, list[float]] = {name: [] for name in seconds}

    def record(name: str, cpu_started: float, wall_started: float) -> None:
        seconds[name].append(time.process_time() - cpu_started)
        wall[name].append(time.perf_counter() - wall_started)

    for trial in range(args.repeats):
        deep_inversion = DeepInversion(
            teacher,
            input_shape=info.input_shape,
            num_classes=info.num_classes,
            config=InversionConfig(iterations=args.di_iterations, **normalization),
        )
        cpu_started, started = time.process_time(), time.perf_counter()
        deep_inversion.sample(args.num_images, generator=torch.Generator().manual_seed(trial))
        record("deepinversion", cpu_started, started)

        student = build_model(args.student, input_shape=info.input_shape, num_classes=info.num_classes, seed=1)
        cpu_started, started = time.process_time(), time.perf_counter()
        game = AdversarialDistillation(
            teacher,
            student,
            input_shape=info.input_shape,
            num_classes=info.num_classes,
            total_iterations=args.generator_iterations,
            generator=torch.Generator().manual_seed(trial),
            config=AdversarialConfig(**normalization),  # type: ignore[arg-type]
        )
        for _ in range(args.generator_iterations):
            game.step()
        record("generator_training", cpu_started, started)
        cpu_started, started = time.process_time(), time.perf_counter()
        game.sample(args.num_images, generator=torch.Generator().manual_seed(trial + 1000))
        record("generator_sampling", cpu_started, started)
        print(
            f"trial {trial + 1}/{args.repeats}: {args.num_images} images, CPU seconds: deepinversion "
            f"{seconds['deepinversion'][-1]:.1f} s; generator training {seconds['generator_training'][-1]:.1f} s, "
            f"then sampling {seconds['generator_sampling'][-1] * 1000:.0f} ms",
            flush=True,
        )
    median = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "dataset": args.dataset,
        "teacher": args.teacher,
        "num_images": args.num_images,
        "threads": args.threads,
        "deepinversion_iterations": args.di_iterations,
        "generator_iterations": args.generator_iterations,
        "deepinversion_images_per_second": args.num_images / median["deepinversion"],
        "generator_sampling_images_per_second": args.num_images / median["generator_sampling"],
        "generator_training_seconds": median["generator_training"],
        "speedup": median["deepinversion"] / median["generator_sampling"],
        "speedup_with_training": median["deepinversion"]
        / (median["generator_training"] + median["generator_sampling"]),
        "cpu_seconds": seconds,
        "wall_seconds": wall,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"deepinversion_ips={result['deepinversion_images_per_second']:.2f} "
        f"generator_ips={result['generator_sampling_images_per_second']:.0f} "
        f"generator_training_s={result['generator_training_seconds']:.1f} "
        f"speedup_with_training={result['speedup_with_training']:.2f} "
        f"speedup={result['speedup']:.0f}"
    )


if __name__ == "__main__":
    main()
