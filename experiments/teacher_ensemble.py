"""What the teachers of a finished (or stopped) simulated run know together: their class-weighted
ensemble on the test split and on the public inputs, read from the run folder's checkpoint.

The student can learn no more than its targets hold, and a run reports only the student. This
scores the source: each simulated client's teacher as the last checkpointed round left it, softened
at the run's temperature and combined per class by the clients' class counts raised to each
``--powers`` value (``strategy.class_weight_power``), and the mean single teacher. A run made with a
``validation_size`` hold-out is scored there too: no teacher trained on it and no teacher's output
on it was ever learned from, so it can choose between powers; the public inputs cannot (the teachers
learn the consensus there and echo it). The test split is read to report only.

    python -m experiments.teacher_ensemble results/my-run --out results/my-run/teacher-ensemble.json

Only simulated runs have teachers in their checkpoint (``engine=inprocess|processes``); a
simulated node ``k`` holds partition ``k − 1``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federation.client_app import TEACHER_STATE
from fedkd.checkpoint import load_checkpoint
from fedkd.data.local import evaluation_split, info_for, private_partition, public_inputs, validation_split
from fedkd.distillation import predict_logits, soften
from fedkd.models import build_model, model_for_client
from fedkd.results import RunFolder
from strategies.aggregation import class_counts, class_weighted


def accuracy(probs: np.ndarray, labels: torch.Tensor) -> float:
    return float((probs.argmax(axis=1) == labels.numpy()).mean())


def teacher_ensemble(run_dir: str | Path, *, powers: tuple[float, ...] = (1.0, 2.0)) -> dict[str, Any]:
    """The checkpointed teachers of ``run_dir`` scored alone and together (see the module)."""
    config = RunFolder(run_dir).stored_config()
    if config is None:
        raise ValueError(f"{run_dir} holds no config.yaml this version can read; give a fedkd-sim run folder.")
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None or not checkpoint.nodes:
        raise ValueError(
            f"{run_dir} holds no checkpoint with the clients' teachers; only simulated runs "
            "(engine=inprocess or processes) keep them. Rerun the command in a fresh folder."
        )
    spec = config.split_spec()
    info = info_for(spec)
    public, test, held_out = public_inputs(spec), evaluation_split(spec), validation_split(spec)
    on_test, on_public, on_held_out, counts, single = [], [], [], [], []
    for node_id, state in sorted(checkpoint.nodes.items(), key=lambda item: int(item[0])):
        client_id = int(node_id) - 1
        teacher = build_model(
            model_for_client(config.teacher_models, client_id),
            input_shape=info.input_shape,
            num_classes=info.num_classes,
        )
        teacher.load_state_dict(state[TEACHER_STATE].to_torch_state_dict())
        test_logits = predict_logits(teacher, test.images)
        on_test.append(soften(test_logits, config.temperature).numpy())
        on_public.append(soften(predict_logits(teacher, public.images), config.temperature).numpy())
        if len(held_out):
            on_held_out.append(soften(predict_logits(teacher, held_out.images), config.temperature).numpy())
        single.append(accuracy(test_logits.numpy(), test.labels))
        counts.append(class_counts(private_partition(spec, client_id).labels.numpy(), info.num_classes))
    stacked_test, stacked_public = np.stack(on_test), np.stack(on_public)
    stacked_held_out = np.stack(on_held_out) if on_held_out else None
    weights = np.stack(counts).astype(np.float64)

    def scores(power: float) -> dict[str, float]:
        row = {
            "class_weight_power": power,
            "test": accuracy(class_weighted(stacked_test, weights, power=power), test.labels),
            "public": accuracy(class_weighted(stacked_public, weights, power=power), public.labels),
        }
        if stacked_held_out is not None:
            row["validation"] = accuracy(class_weighted(stacked_held_out, weights, power=power), held_out.labels)
        return row

    result: dict[str, Any] = {
        "run": str(run_dir),
        "round": checkpoint.server_round,
        "teachers": len(single),
        "mean_teacher_test": float(np.mean(single)),
        "validation_size": len(held_out),
        "ensembles": [scores(power) for power in powers],
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--powers", type=float, nargs="+", default=[1.0, 2.0], help="class_weight_power values")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the result here as JSON too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = teacher_ensemble(args.run_dir, powers=tuple(args.powers))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
