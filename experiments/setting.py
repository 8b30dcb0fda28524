"""The federated setting an offline experiment works in: the dataset, split and seed of the
``fedkd-sim`` run it stands beside, so that its public inputs, private partitions and test split
are that run's."""

from __future__ import annotations

import argparse

from fedkd.config import PartitionConfig, RunConfig


def add_setting_arguments(parser: argparse.ArgumentParser, *, public_size: int = 2000) -> None:
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the partition")
    parser.add_argument("--public-size", type=int, default=public_size)
    parser.add_argument("--seed", type=int, default=0)


def setting_config(args: argparse.Namespace) -> RunConfig:
    """The run's config (today's defaults elsewhere) for :func:`add_setting_arguments`'s values."""
    return RunConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        num_clients=args.num_clients,
        partition=PartitionConfig(scheme="dirichlet", alpha=args.alpha),
        public_size=args.public_size,
        seed=args.seed,
    )
