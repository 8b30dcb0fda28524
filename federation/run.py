"""One federated run on a Flower Grid: build the strategy, run its rounds, record each one.

The ServerApp (any Flower runtime) and ``fedkd-sim`` (any engine) both call
:func:`run_federation`; the strategy's own ``start()`` owns the round loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from federation.metered_grid import MeteredGrid, Traffic
from fedkd.checkpoint import Checkpoint, ResumeError, load_checkpoint, save_checkpoint
from fedkd.config import ClientTask, RunConfig
from fedkd.data.local import evaluation_split, info_for, split_for, validation_split
from fedkd.distillation import Evaluation, evaluate
from fedkd.models import build_model
from fedkd.results import RunFolder, progress_line
from fedkd.seeding import SeedPurpose, derive_seed
from strategies.registry import CheckpointableStrategy, build_strategy, check_run

logger = logging.getLogger(__name__)


@runtime_checkable
class NodeStateGrid(Protocol):
    """A grid that holds its simulated clients' state and can hand it over and back (the
    in-process and processes engines): checkpoints then carry the clients' teachers and ledgers too."""

    def node_states(self) -> dict[int, RecordDict]: ...

    def restore_node_states(self, states: dict[int, RecordDict]) -> None: ...


# Flower's FedAvg reports the weighted mean of every client metric; an id has no mean.
_FEDAVG_DROPPED_METRICS = ("client-id", "num-examples")


class RecordedStrategy(Strategy):
    """Wraps a strategy and keeps its latest aggregated train metrics for the round record."""

    def __init__(self, inner: Strategy, *, rounds_done: int = 0) -> None:
        if not isinstance(inner, CheckpointableStrategy):
            raise TypeError(f"{type(inner).__name__} does not implement CheckpointableStrategy.")
        self.inner: CheckpointableStrategy = inner
        self.flower: Strategy = inner
        # On resume Flower counts rounds from 1 again; the strategy and its seeds see the real ones.
        self.rounds_done = rounds_done
        self.latest_train_metrics: dict[str, Any] = {}
        self.latest_evaluate_metrics: dict[str, Any] = {}

    def summary(self) -> None:
        self.flower.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.latest_train_metrics = {}
        return self.flower.configure_train(server_round + self.rounds_done, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.flower.aggregate_train(server_round + self.rounds_done, replies)
        self.latest_train_metrics = dict(metrics or {})
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.flower.configure_evaluate(server_round + self.rounds_done, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = self.flower.aggregate_evaluate(server_round + self.rounds_done, replies)
        self.latest_evaluate_metrics = dict(metrics or {})
        return metrics

    def state_records(self) -> dict[str, Any]:
        return self.inner.state_records()

    def load_state_records(self, state: dict[str, Any]) -> None:
        self.inner.load_state_records(state)

    def privacy_state(self) -> dict[str, Any] | None:
        return self.inner.privacy_state()

    @property
    def evaluates_on_clients(self) -> bool:
        """True for strategies without a global model (FD): the clients report accuracy."""
        return self.inner.evaluates_on_clients


class RoundRecorder:
    """Centralized evaluation callback: evaluates the student and writes one row per round."""

    def __init__(
        self,
        *,
        config: RunConfig,
        student: torch.nn.Module,
        grid: MeteredGrid,
        strategy: RecordedStrategy,
        folder: RunFolder | None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        node_states: Callable[[], dict[int, RecordDict]] | None = None,
        previous_rows: list[dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.node_states = node_states
        self.student = student
        self.grid = grid
        self.strategy = strategy
        self.folder = folder
        self.on_round = on_round
        self.test = evaluation_split(config.split_spec())
        # Scored beside the test split so that settings can be chosen on it; None without a hold-out.
        self.validation = validation_split(config.split_spec()) if config.validation_size > 0 else None
        if self.validation is not None and strategy.evaluates_on_clients:
            self.validation = None
            logger.warning(
                "validation_size=%d: strategy=%s keeps its students on the clients, which score them on "
                "their side; the hold-out stays out of the partitions but no validation_accuracy is recorded.",
                config.validation_size,
                config.strategy.name,
            )
        self.rows: list[dict[str, Any]] = list(previous_rows or [])
        self._round_started = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        resumed = self.strategy.rounds_done
        if server_round == 0 and resumed:
            self._round_started = time.perf_counter()
            return MetricRecord({})  # the resumed student was evaluated when its round finished
        server_round += resumed
        if self.strategy.evaluates_on_clients:
            reported = self.strategy.latest_evaluate_metrics
            result = Evaluation(
                accuracy=float(reported.get("accuracy", float("nan"))),
                loss=float(reported.get("loss", float("nan"))),
            )
        else:
            self.student.load_state_dict(arrays.to_torch_state_dict())
            result = evaluate(self.student, self.test.images, self.test.labels)
        traffic = self.grid.take_traffic()
        if server_round > 0:
            row = self._row(server_round, result.accuracy, result.loss, traffic)
            if self.validation is not None:
                held_out = evaluate(self.student, self.validation.images, self.validation.labels)
                row["validation_accuracy"], row["validation_loss"] = held_out.accuracy, held_out.loss
            self._record(server_round, arrays, row)
        self._round_started = time.perf_counter()
        return MetricRecord({"student-accuracy": result.accuracy, "student-loss": result.loss})

    def _row(self, server_round: int, accuracy: float, loss: float, traffic: Traffic) -> dict[str, Any]:
        train = self.strategy.latest_train_metrics
        rejected = int(train.get("rejected", 0))
        failed_nodes = sorted(set(traffic.failed_nodes))  # a node can fail a query and a train message
        row: dict[str, Any] = {
            "round": server_round,
            "student_accuracy": accuracy,
            "student_loss": loss,
            "clients": int(train.get("clients", traffic.replies - traffic.error_replies - rejected)),
            "failed": len(failed_nodes),
            "rejected": rejected,
            "bytes_up": traffic.bytes_up,
            "bytes_down": traffic.bytes_down,
            "messages": traffic.messages_down,
            "wall_seconds": time.perf_counter() - self._round_started,
        }
        extra = {
            key.replace("-", "_"): value
            for key, value in train.items()
            if key not in ("clients", "failed", "rejected", *_FEDAVG_DROPPED_METRICS)
        }
        row.update(extra)
        row["failed_nodes"] = failed_nodes
        return row

    def _record(self, server_round: int, arrays: ArrayRecord, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.folder is not None:
            # Checkpoint first: a kill between the two writes leaves a row that resume drops.
            save_checkpoint(
                self.folder.path,
                Checkpoint(
                    server_round,
                    arrays,
                    self.strategy.state_records(),
                    self.node_states() if self.node_states is not None else {},
                ),
            )
            self.folder.append_metrics(row)
        if self.folder is not None and not self.strategy.evaluates_on_clients:
            self.folder.save_student(
                self.student.state_dict(), architecture=self.config.student_model, server_round=server_round
            )
        privacy = self.strategy.privacy_state()
        if self.folder is not None and privacy is not None:
            self.folder.save_privacy(privacy, server_round=server_round)
        if self.on_round is not None:
            self.on_round(row)


def print_progress(total_rounds: int) -> Callable[[dict[str, Any]], None]:
    def report(row: dict[str, Any]) -> None:
        print(progress_line(row, total_rounds=total_rounds), flush=True)

    return report


def check_data(config: RunConfig) -> None:
    """Check the strategy supports the run, then load the dataset and split it, so bad names,
    paths or sizes fail before any training."""
    check_run(config)
    spec = config.split_spec()
    info_for(spec)
    split_for(spec)
    evaluation_split(spec)


def run_federation(
    grid: Grid,
    config: RunConfig,
    *,
    run_dir: str | Path | None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run ``config.rounds`` rounds on ``grid``; returns the per-round rows it recorded.

    Bad configuration (too many clients, a transfer set larger than the data, unknown names)
    fails here, before any client trains. ``resume`` continues the run in ``run_dir`` from its
    last checkpoint (see :mod:`fedkd.checkpoint`); with no checkpoint there it starts afresh.
    """
    check_data(config)
    info = info_for(config.split_spec())
    folder = RunFolder(run_dir) if run_dir is not None else None
    student = build_model(
        config.student_model,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        seed=derive_seed(config.seed, SeedPurpose.STUDENT_INIT),
    )
    inner = build_strategy(config, info=info, student_model=student)
    checkpoint = _resumable_checkpoint(folder, config, grid) if resume else None
    if folder is not None and checkpoint is None:
        folder.write_config(config)
        folder.start_metrics()
    previous_rows: list[dict[str, Any]] = []
    initial_arrays = ArrayRecord(student.state_dict())
    strategy = RecordedStrategy(inner, rounds_done=checkpoint.server_round if checkpoint else 0)
    if checkpoint is not None:
        assert folder is not None
        previous_rows = folder.keep_metrics_through(checkpoint.server_round)
        strategy.load_state_records(checkpoint.strategy)
        initial_arrays = checkpoint.arrays
        if len(initial_arrays) > 0:
            student.load_state_dict(initial_arrays.to_torch_state_dict())
        if checkpoint.nodes:
            assert isinstance(grid, NodeStateGrid)  # checked by _resumable_checkpoint
            grid.restore_node_states(checkpoint.nodes)
        logger.warning("resuming %s after round %d of %d", folder.path, checkpoint.server_round, config.rounds)
        if checkpoint.server_round >= config.rounds:
            return previous_rows
    metered = MeteredGrid(grid)
    recorder = RoundRecorder(
        config=config,
        student=student,
        grid=metered,
        strategy=strategy,
        folder=folder,
        on_round=on_round,
        node_states=grid.node_states if isinstance(grid, NodeStateGrid) else None,
        previous_rows=previous_rows,
    )
    task = ClientTask(mode=check_run(config).client_mode, server_round=0, run=config).to_record()
    task.pop("server-round")  # each strategy stamps the round itself
    strategy.start(
        grid=metered,
        initial_arrays=initial_arrays,
        num_rounds=config.rounds - strategy.rounds_done,
        timeout=config.round_timeout,
        train_config=ConfigRecord(task),
        evaluate_config=ConfigRecord(task),
        evaluate_fn=recorder,
    )
    return recorder.rows


def _resumable_checkpoint(folder: RunFolder | None, config: RunConfig, grid: Grid) -> Checkpoint | None:
    """The checkpoint to continue from, after checking it belongs to this run; ``None`` if the run
    never finished a round."""
    if folder is None:
        raise ResumeError("resume=true needs a run folder: give the interrupted run's hydra.run.dir.")
    stored = folder.stored_config()
    if stored is not None and not config.same_run(stored):
        raise ResumeError(
            f"{folder.path} holds a run with a different configuration; resume it with the same "
            "settings, or start a new run in another folder."
        )
    checkpoint = load_checkpoint(folder.path)
    if checkpoint is None:
        logger.warning("%s holds no checkpoint yet; starting the run from round 1.", folder.path)
        return None
    if checkpoint.nodes and not isinstance(grid, NodeStateGrid):
        raise ResumeError(
            "this checkpoint holds the simulated clients' state, which only the in-process, processes and ray "
            "engines can restore; resume with engine=inprocess, engine=processes or engine=ray."
        )
    return checkpoint
