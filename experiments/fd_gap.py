"""Where the federated-distillation student loses accuracy: the teachers' ensemble or the transfer set.

Replays ``strategy=ensemble_distillation`` (optionally with FedMD/DS-FL's digest step) without
Flower, on the same split, teachers, seeds and training functions as ``fedkd-sim``, and reports
per round what the run itself cannot see: the test accuracy of the teachers' ensemble (the
aggregate the student is distilled from, evaluated on test inputs), the mean accuracy of a
single teacher, and the student's. It also measures the transfer-set ceiling: the same student
trained on the public inputs with their *true* labels, which no soft-label aggregate on those
inputs can be expected to beat by much.

Test labels are used only to report, never to select.

    python -m experiments.fd_gap --dataset fashion_mnist --data-root ../shared/data \
        --num-clients 100 --rounds 4 --out results/fd_recipe/gap/fashion_mnist-ed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedkd.config import TEACHERS_BY_SETTING, PartitionConfig, RunConfig, StrategyConfig
from fedkd.data.local import evaluation_split, info_for, private_partition, public_inputs
from fedkd.distillation import (
    OptimizerSettings,
    distill,
    evaluate,
    lacked_classes,
    lacked_mass,
    predict_logits,
    soften,
    train_supervised,
    train_with_consensus,
)
from fedkd.messages import consensus_record, consensus_targets
from fedkd.models import build_model, model_for_client
from fedkd.seeding import SeedPurpose, derive_seed, torch_generator
from strategies.aggregation import PER_CLASS_WEIGHTS, class_counts, entropy_reduce, get_aggregator


def label_ceiling(config: RunConfig, *, epochs: int) -> float:
    """Test accuracy of the student trained on the public inputs with their true labels."""
    spec = config.split_spec()
    info = info_for(spec)
    public = public_inputs(spec)
    test = evaluation_split(spec)
    student = build_model(
        config.student_model,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        seed=derive_seed(config.seed, SeedPurpose.STUDENT_INIT),
    )
    train_supervised(
        student,
        public.images,
        public.labels,
        epochs=epochs,
        settings=OptimizerSettings(lr=config.lr, batch_size=config.batch_size),
        generator=torch_generator(config.seed, SeedPurpose.DISTILL),
        max_shift=config.augment_shift,
    )
    return evaluate(student, test.images, test.labels).accuracy


def replay(
    config: RunConfig,
    *,
    digest_sharpen: float | None,
    test_size: int,
    consensus_weight: float = 0.0,
    lacked_share: float = 0.0,
) -> list[dict[str, Any]]:
    """One row per round: ensemble, mean-teacher and student test accuracy."""
    torch.set_num_threads(1)
    spec = config.split_spec()
    info = info_for(spec)
    public = public_inputs(spec)
    test = evaluation_split(spec)
    test_images, test_labels = test.images[:test_size], test.labels[:test_size].numpy()
    settings = OptimizerSettings(lr=config.lr, batch_size=config.batch_size)
    aggregator = get_aggregator(config.aggregator)
    per_class = config.aggregator in PER_CLASS_WEIGHTS  # weights are then class counts
    clients = [k for k in range(config.num_clients) if len(private_partition(spec, k)) > 0]
    teachers = {
        k: build_model(
            model_for_client(config.teacher_models, k),
            input_shape=info.input_shape,
            num_classes=info.num_classes,
            seed=derive_seed(config.seed, k, SeedPurpose.TEACHER_INIT),
        )
        for k in clients
    }
    student = build_model(
        config.student_model,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        seed=derive_seed(config.seed, SeedPurpose.STUDENT_INIT),
    )
    consensus: torch.Tensor | None = None
    public_positions = np.arange(len(public.images))
    rows = []
    for server_round in range(1, config.rounds + 1):
        started = time.process_time()
        public_probs, test_probs, weights = [], [], []
        for k in clients:
            teacher, partition = teachers[k], private_partition(spec, k)
            if consensus is not None and config.strategy.digest_epochs > 0:
                distill(
                    teacher,
                    public.images,
                    consensus,
                    epochs=config.strategy.digest_epochs,
                    temperature=config.temperature,
                    settings=settings,
                    generator=torch_generator(config.seed, server_round, k, SeedPurpose.TEACHER_DIGEST),
                    max_shift=config.augment_shift,
                )
            if consensus is not None and consensus_weight > 0:
                input_weights = None
                if lacked_share > 0:
                    counts = torch.bincount(partition.labels, minlength=info.num_classes)
                    input_weights = lacked_mass(consensus, lacked_classes(counts, share=lacked_share))
                train_with_consensus(
                    teacher,
                    partition.images,
                    partition.labels,
                    public.images,
                    consensus,
                    weight=consensus_weight,
                    temperature=config.temperature,
                    epochs=config.local_epochs,
                    settings=settings,
                    generator=torch_generator(config.seed, server_round, k, SeedPurpose.TEACHER_TRAIN),
                    max_shift=config.augment_shift,
                    input_weights=input_weights,
                )
            else:
                train_supervised(
                    teacher,
                    partition.images,
                    partition.labels,
                    epochs=config.local_epochs,
                    settings=settings,
                    generator=torch_generator(config.seed, server_round, k, SeedPurpose.TEACHER_TRAIN),
                    max_shift=config.augment_shift,
                )
            public_probs.append(soften(predict_logits(teacher, public.images), config.temperature).numpy())
            test_probs.append(soften(predict_logits(teacher, test_images), config.temperature).numpy())
            weights.append(class_counts(partition.labels, info.num_classes) if per_class else len(partition))
        client_weights = np.stack(weights).astype(np.float64)
        aggregate = aggregator(np.stack(public_probs), client_weights)
        ensemble_on_test = aggregator(np.stack(test_probs), client_weights)
        shared = aggregate if digest_sharpen is None else entropy_reduce(aggregate, temperature=digest_sharpen)
        # As it travels: float16 on the wire, renormalized rows on the client.
        consensus = torch.from_numpy(consensus_targets(consensus_record(public_positions, shared))[1])
        distill(
            student,
            public.images,
            torch.from_numpy(aggregate),
            epochs=config.distill_epochs,
            temperature=config.temperature,
            settings=settings,
            generator=torch_generator(config.seed, server_round, SeedPurpose.DISTILL),
            max_shift=config.distill_shift,
            average_decay=config.distill_ema,
        )
        row = {
            "round": server_round,
            "ensemble_test_accuracy": float((ensemble_on_test.argmax(1) == test_labels).mean()),
            "ensemble_public_accuracy": float((aggregate.argmax(1) == public.labels.numpy()).mean()),
            "mean_teacher_test_accuracy": float(np.mean([(p.argmax(1) == test_labels).mean() for p in test_probs])),
            "student_accuracy": evaluate(student, test.images, test.labels).accuracy,
            "cpu_seconds": time.process_time() - started,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--public-size", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=RunConfig.rounds)
    parser.add_argument("--local-epochs", type=int, default=RunConfig.local_epochs)
    parser.add_argument("--distill-epochs", type=int, default=RunConfig.distill_epochs)
    parser.add_argument(
        "--augment-shift", type=float, default=RunConfig.augment_shift, help="random shifts, teachers and student"
    )
    parser.add_argument(
        "--student-shift",
        type=float,
        default=None,
        help="the student's own random shifts (student_shift; default: --augment-shift, as before the setting)",
    )
    parser.add_argument("--temperature", type=float, default=RunConfig.temperature)
    parser.add_argument(
        "--aggregator", default=StrategyConfig.aggregator, help="strategy.aggregator (auto: class-weighted)"
    )
    parser.add_argument("--digest-epochs", type=int, default=0, help="FedMD/DS-FL digest of the consensus")
    parser.add_argument("--digest-sharpen", type=float, default=None, help="DS-FL's ERA on the consensus sent down")
    parser.add_argument(
        "--consensus-weight", type=float, default=0.0, help="strategy.consensus_weight (co-distillation; 0: off)"
    )
    parser.add_argument(
        "--consensus-lacked-share",
        type=float,
        default=StrategyConfig.consensus_lacked_share,
        help="strategy.consensus_lacked_share (0: every public input)",
    )
    parser.add_argument("--distill-ema", type=float, default=0.0, help="the student's weight average")
    parser.add_argument(
        "--client-models",
        default=",".join(TEACHERS_BY_SETTING),
        help="the teachers' architectures, comma-separated, round-robin over the clients (auto: fedkd-sim's)",
    )
    parser.add_argument("--ceiling-epochs", type=int, default=20)
    parser.add_argument("--test-size", type=int, default=1000, help="test inputs the teachers are scored on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = RunConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        num_clients=args.num_clients,
        partition=PartitionConfig(scheme="dirichlet", alpha=args.alpha),
        strategy=StrategyConfig(aggregator=args.aggregator, digest_epochs=args.digest_epochs),
        public_size=args.public_size,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        distill_epochs=args.distill_epochs,
        temperature=args.temperature,
        augment_shift=args.augment_shift,
        distill_ema=args.distill_ema,
        client_models=tuple(args.client_models.split(",")),
        seed=args.seed,
    )
    # The replays in README ran before student_shift: their student moved as the teachers did.
    student_shift = config.augment_shift if args.student_shift is None else args.student_shift
    config = dataclasses.replace(config, student_shift=student_shift)
    torch.set_num_threads(1)
    result: dict[str, Any] = {"args": vars(args)}
    result["label_ceiling_accuracy"] = label_ceiling(config, epochs=args.ceiling_epochs)
    print(json.dumps({"label_ceiling_accuracy": result["label_ceiling_accuracy"]}), flush=True)
    result["rounds"] = replay(
        config,
        digest_sharpen=args.digest_sharpen,
        test_size=args.test_size,
        consensus_weight=args.consensus_weight,
        lacked_share=args.consensus_lacked_share,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
