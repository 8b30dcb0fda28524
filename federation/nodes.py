"""Check the federation before round 1: does it have as many nodes as the run has clients?

A run's ``num-clients`` fixes its data split (one private partition per client), so the
ServerApp needs that many nodes. ``flwr run .`` simulates 2 SuperNodes unless told otherwise,
while the default run config asks for 10 clients; without this check the strategy's sampler
waits (silently, up to 10 minutes) for nodes that never come, and then every client fails its
partition check. The check fails at once instead, naming the two ways to make the numbers agree.

Flower's simulation registers all its nodes in one go when it starts, so there the first
non-empty node list is final and must match exactly. A deployment's SuperNodes connect over a
while, so there the check waits up to ``node-wait-timeout`` seconds for ``num-clients`` nodes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from flwr.serverapp import Grid

from fedkd.config import RunConfig

# The run-config key of RunConfig.node_wait_timeout, named in the error message.
NODE_WAIT_TIMEOUT_KEY = "node-wait-timeout"


class FederationSizeError(RuntimeError):
    """The federation's size does not match the run's number of clients."""


def registers_nodes_at_once(grid: Grid) -> bool:
    """True for Flower's simulation runtime, which registers every simulated node in one go."""
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # a Flower without it: treat every grid as a deployment's
        return False
    return isinstance(grid, InMemoryGrid)


def wrong_size_message(connected: int, needed: int, waited: float) -> str:
    return (
        f"fedkd: the run expects num-clients={needed} nodes but the federation has {connected} "
        f"(checked after {waited:.0f} s). Either give the federation {needed} nodes:\n"
        f'    flwr run . --stream --federation-config "num-supernodes={needed}"\n'
        f"or run with the nodes it has:\n"
        f'    flwr run . --stream --run-config "num-clients={max(connected, 1)}"\n'
        f"(a deployment: start {needed} SuperNodes with --node-config "
        f"'partition-id=<k> num-partitions={needed}', or raise {NODE_WAIT_TIMEOUT_KEY} "
        "if they are slow to connect)."
    )


def await_nodes(
    grid: Grid,
    *,
    needed: int,
    timeout: float,
    all_at_once: bool | None = None,
    poll: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """The connected node ids once ``needed`` are there; :class:`FederationSizeError` if not.

    Waits at most ``timeout`` seconds. With ``all_at_once`` (default: the simulation runtime)
    the first non-empty answer is final, no further nodes will join, and it must be exactly
    ``needed`` nodes.
    """
    if all_at_once is None:
        all_at_once = registers_nodes_at_once(grid)
    started = clock()
    last_reported = -1
    while True:
        node_ids = list(grid.get_node_ids())
        waited = clock() - started
        if all_at_once and node_ids:
            # Every simulated node holds num-partitions = the federation's size, so a
            # federation larger than num-clients fails in every client: refuse it here too.
            if len(node_ids) == needed:
                return node_ids
            raise FederationSizeError(wrong_size_message(len(node_ids), needed, waited))
        if len(node_ids) >= needed:
            return node_ids
        if waited >= timeout:
            raise FederationSizeError(wrong_size_message(len(node_ids), needed, waited))
        if len(node_ids) != last_reported:
            print(
                f"fedkd: waiting up to {timeout:.0f} s for {needed} nodes; {len(node_ids)} connected",
                flush=True,
            )
            last_reported = len(node_ids)
        sleep(min(poll, max(timeout - waited, 0.0)))


def fit_to_simulation(grid: Grid, config: RunConfig, *, timeout: float) -> RunConfig:
    """The run config sized to a simulated federation when the run does not ask otherwise.

    ``flwr run .`` simulates 2 SuperNodes unless told otherwise, while the default run config
    asks for 10 clients. Flower does not say whether ``num-clients`` was set on the command
    line, so the default value counts as unset: a simulation of another size runs with one
    client per node (and says so). Any other ``num-clients`` insists, and a mismatch fails in
    :func:`await_nodes` with the fix. A deployment's nodes join over time, so it is never resized.
    """
    default = RunConfig().num_clients
    if config.num_clients != default or not registers_nodes_at_once(grid):
        return config
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while not node_ids and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    if not node_ids or len(node_ids) == default:
        return config
    print(
        f"fedkd: this simulated federation has {len(node_ids)} nodes and the run config leaves num-clients "
        f"at its default ({default}): running with num-clients={len(node_ids)}. For {default} clients: "
        f'flwr run . --stream --federation-config "num-supernodes={default}"',
        flush=True,
    )
    return dataclasses.replace(config, num_clients=len(node_ids))
