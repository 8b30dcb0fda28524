"""Speed of a client's local training with channels-last weights (``build_model``'s layout)
against the standard layout, on one thread, in the same process.

    python benchmarks/channels_last.py --out results/scale/channels-last.json

Each model is a teacher of the 100-client Fashion-MNIST split (client 0's 376 images): three
local epochs with co-distillation toward a consensus on 2,000 public inputs, as a round of the
default run trains it. The layouts alternate over ``--repeats`` runs after one warm-up each, and
the median seconds are compared (ratio > 1: channels-last is faster). Also reports the largest
logit difference between the layouts for the same weights (float rounding only) and after the
same training (where the rounding has compounded over the steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedkd.config import PartitionConfig, RunConfig
from fedkd.data.local import private_partition, public_inputs
from fedkd.distillation import OptimizerSettings, predict_logits, train_with_consensus
from fedkd.models import build_model, with_layout

LAYOUTS = {"standard": torch.contiguous_format, "channels_last": torch.channels_last}


def train_once(architecture: str, layout: torch.memory_format, data, public, consensus) -> tuple[float, torch.Tensor]:
    """Seconds for one client's local training in ``layout``, and the trained model's logits."""
    model = with_layout(build_model(architecture, input_shape=(1, 28, 28), num_classes=10, seed=0), layout)
    started = time.perf_counter()
    train_with_consensus(
        model,
        data.images,
        data.labels,
        public,
        consensus,
        weight=1.0,
        temperature=4.0,
        epochs=3,
        settings=OptimizerSettings(lr=1e-3, batch_size=32),
        generator=torch.Generator().manual_seed(0),
    )
    return time.perf_counter() - started, predict_logits(model, public[:500])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--models", nargs="+", default=["cnn_fc", "lenet5_bn", "cnn_small"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = RunConfig(
        dataset="fashion_mnist",
        data_root=args.data_root,
        num_clients=100,
        partition=PartitionConfig(scheme="dirichlet", alpha=0.5),
        public_size=2000,
    )
    spec = config.split_spec()
    data, public = private_partition(spec, 0), public_inputs(spec).images
    consensus = torch.softmax(torch.randn(len(public), 10, generator=torch.Generator().manual_seed(0)), dim=1)
    rows = []
    for architecture in args.models:
        seconds: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        logits = {}
        for layout in LAYOUTS.values():
            train_once(architecture, layout, data, public, consensus)  # warm-up
        for _ in range(args.repeats):
            for name, layout in LAYOUTS.items():
                elapsed, logits[name] = train_once(architecture, layout, data, public, consensus)
                seconds[name].append(elapsed)
        median = {name: statistics.median(values) for name, values in seconds.items()}
        same_weights = build_model(architecture, input_shape=(1, 28, 28), num_classes=10, seed=0)
        untrained = {
            name: predict_logits(with_layout(same_weights, layout), public[:500]) for name, layout in LAYOUTS.items()
        }
        row = {
            "model": architecture,
            "examples": len(data.images),
            **{f"{name}_seconds": round(value, 3) for name, value in median.items()},
            "speedup": round(median["standard"] / median["channels_last"], 2),
            "max_logit_difference_same_weights": float(
                (untrained["standard"] - untrained["channels_last"]).abs().max()
            ),
            "max_logit_difference_after_training": float((logits["standard"] - logits["channels_last"]).abs().max()),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
