"""Synthesis throughput: DeepInversion (per-batch pixel optimization) vs the amortized generator.

Both synthesizers invert the same trained teacher with their default loss weights, in the same
process, alternating over ``--repeats`` trials, and the script reports images per second for
each and their ratio (the machine's speed and load cancel out of the ratio). The generator's
time includes training it; its marginal cost per extra image after training is reported too.

    python benchmarks/synthesis_throughput.py --dataset mnist --data-root ../shared/data \
        --num-images 256 --repeats 2 --out results/datafree/throughput.json
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
from generators.amortized import AmortizedGenerator, GeneratorConfig
from generators.deepinversion import DeepInversion, InversionConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--teacher", default="cnn_small")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--di-iterations", type=int, default=200)
    parser.add_argument("--generator-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (simulated clients use 1)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
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
    normalization = dict(pixel_mean=info.mean, pixel_std=info.std)
    seconds: dict[str, list[float]] = {"deepinversion": [], "generator": [], "generator_sampling": []}
    for trial in range(args.repeats):
        deep_inversion = DeepInversion(
            teacher,
            input_shape=info.input_shape,
            num_classes=info.num_classes,
            config=InversionConfig(iterations=args.di_iterations, **normalization),
        )
        started = time.perf_counter()
        deep_inversion.sample(args.num_images, generator=torch.Generator().manual_seed(trial))
        seconds["deepinversion"].append(time.perf_counter() - started)

        amortized = AmortizedGenerator(
            teacher,
            input_shape=info.input_shape,
            num_classes=info.num_classes,
            config=GeneratorConfig(steps=args.generator_steps, **normalization),
        )
        started = time.perf_counter()
        amortized.sample(args.num_images, generator=torch.Generator().manual_seed(trial))
        seconds["generator"].append(time.perf_counter() - started)
        started = time.perf_counter()
        amortized.sample(args.num_images, generator=torch.Generator().manual_seed(trial + 1000))
        seconds["generator_sampling"].append(time.perf_counter() - started)
        print(
            f"trial {trial + 1}/{args.repeats}: deepinversion {seconds['deepinversion'][-1]:.1f} s, "
            f"generator {seconds['generator'][-1]:.1f} s (of which sampling "
            f"{seconds['generator_sampling'][-1] * 1000:.0f} ms) for {args.num_images} images",
            flush=True,
        )
    median = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "dataset": args.dataset,
        "teacher": args.teacher,
        "num_images": args.num_images,
        "threads": args.threads,
        "deepinversion_iterations": args.di_iterations,
        "generator_steps": args.generator_steps,
        "deepinversion_images_per_second": args.num_images / median["deepinversion"],
        "generator_images_per_second": args.num_images / median["generator"],
        "generator_sampling_images_per_second": args.num_images / median["generator_sampling"],
        "speedup": median["deepinversion"] / median["generator"],
        "seconds": seconds,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"deepinversion_ips={result['deepinversion_images_per_second']:.1f} "
        f"generator_ips={result['generator_images_per_second']:.1f} "
        f"generator_sampling_ips={result['generator_sampling_images_per_second']:.0f} "
        f"speedup={result['speedup']:.2f}"
    )


if __name__ == "__main__":
    main()
