"""Feature statistics hooks: what a batch looks like to each normalization layer of a model.

DeepInversion (Yin et al., CVPR 2020) synthesizes inputs whose per-channel statistics at every
BatchNorm layer match the statistics the layer saw in training. This module only *collects*
those statistics: :func:`bn_statistics` attaches forward hooks for the lifetime of a ``with``
block and removes them on exit, so no hook keeps firing during a later distillation. The loss
itself is the pure function :func:`generators.losses.feature_matching_loss`.

The statistics to match are pluggable (:class:`StatisticsTargets`): a teacher's own running
statistics (:class:`RunningStatistics`) or statistics given from outside, e.g. released under
differential privacy (:class:`SuppliedStatistics`). A teacher trained with DP-SGD has GroupNorm
where BatchNorm was (BatchNorm mixes examples, which per-sample gradients forbid) and keeps no
running statistics; its GroupNorm inputs are watched the same way, against supplied targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from generators.losses import feature_matching_loss

# The layers whose input statistics are matched. Their running statistics are per channel
# (dimension 1), whatever the number of trailing dimensions.
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NORMALIZATION_TYPES: tuple[type[nn.Module], ...] = (*BATCHNORM_TYPES, nn.GroupNorm)

# DeepInversion's ImageNet code weights the first BatchNorm layer ten times the others
# (``first_bn_multiplier = 10``): the first layer sees the pixels, whose statistics decide
# colour and contrast, and its loss is small next to the sum over all deeper layers.
DEFAULT_FIRST_BN_MULTIPLIER = 10.0

LayerStatistics = tuple[torch.Tensor, torch.Tensor]
"""Per-channel ``(mean, biased variance)`` of one BatchNorm layer's input, each ``(C,)``."""


def normalization_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm and GroupNorm layers of ``model`` in :meth:`~torch.nn.Module.modules` order.

    This order is the one every list of per-layer statistics in this module follows.
    """
    return [module for module in model.modules() if isinstance(module, NORMALIZATION_TYPES)]


def layer_channels(layer: nn.Module) -> int:
    """Number of channels a normalization layer's input has."""
    if isinstance(layer, nn.GroupNorm):
        return layer.num_channels
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return layer.num_features
    raise TypeError(f"{type(layer).__name__} is not a normalization layer fedkd knows.")


def layer_weights(num_layers: int, *, first_multiplier: float) -> list[float]:
    """Weights ``[first_multiplier, 1, 1, …]`` for :func:`feature_matching_loss`."""
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}.")
    if first_multiplier < 0:
        raise ValueError(f"first_multiplier must be >= 0, got {first_multiplier}.")
    return [first_multiplier] + [1.0] * (num_layers - 1) if num_layers else []


@runtime_checkable
class StatisticsTargets(Protocol):
    """Per-layer ``(mean, variance)`` that a synthesized batch should reproduce."""

    def per_layer(self) -> list[LayerStatistics]:
        """One ``(mean, var)`` pair per BatchNorm layer, in :func:`normalization_layers` order."""
        ...


class _CopiedStatistics:
    """A fixed list of per-layer statistics, copied on construction and validated per layer."""

    def __init__(self, statistics: Sequence[LayerStatistics]) -> None:
        copied: list[LayerStatistics] = []
        for index, pair in enumerate(statistics):
            if len(pair) != 2:
                raise ValueError(f"statistics[{index}] has {len(pair)} entries; give a (mean, var) pair per layer.")
            mean, var = (torch.as_tensor(t).detach().clone() for t in pair)
            if mean.dim() != 1 or mean.shape != var.shape:
                raise ValueError(
                    f"statistics[{index}]: mean {tuple(mean.shape)} and var {tuple(var.shape)} "
                    "must be 1-D tensors of the same length (one entry per channel)."
                )
            if bool((var < 0).any()):
                raise ValueError(f"statistics[{index}]: variances must be >= 0.")
            copied.append((mean, var))
        self._statistics = copied

    def per_layer(self) -> list[LayerStatistics]:
        return list(self._statistics)

    def __len__(self) -> int:
        return len(self._statistics)


class SuppliedStatistics(_CopiedStatistics):
    """Statistics given from outside the model, e.g. privately released by a client.

    Parameters
    ----------
    statistics : Sequence[tuple[Tensor, Tensor]]
        One ``(mean, var)`` pair of 1-D tensors per BatchNorm layer, in
        :func:`normalization_layers` order. They are copied: later changes to the caller's
        tensors do not reach this object. Whether they fit a model is checked where they
        meet one (:func:`check_statistics`).
    """


class RunningStatistics(_CopiedStatistics):
    """The running mean and variance each BatchNorm layer accumulated during training."""

    @classmethod
    def from_model(cls, model: nn.Module) -> RunningStatistics:
        """Copy the running statistics of every BatchNorm layer of ``model``."""
        layers = normalization_layers(model)
        if not layers:
            raise ValueError(
                f"{type(model).__name__} has no BatchNorm layer, so it has no running statistics "
                "to invert; use a teacher with BatchNorm (e.g. 'cnn_small', 'lenet5_bn')."
            )
        statistics = []
        for index, layer in enumerate(layers):
            if getattr(layer, "running_mean", None) is None or getattr(layer, "running_var", None) is None:
                raise ValueError(
                    f"normalization layer {index} of {type(model).__name__} "
                    f"({type(layer).__name__}) keeps no running statistics (GroupNorm, e.g. a "
                    "DP-SGD teacher, or track_running_stats=False); supply them with "
                    "SuppliedStatistics (fedkd.privacy.feature_statistics releases them privately)."
                )
            mean, var = layer.running_mean, layer.running_var
            assert isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)  # checked above
            statistics.append((mean, var))
        return cls(statistics)


def check_statistics(targets: StatisticsTargets, model: nn.Module) -> list[LayerStatistics]:
    """Return ``targets.per_layer()`` after checking it fits the BatchNorm layers of ``model``.

    Raises
    ------
    ValueError
        If the number of layers or the number of channels of a layer differs.
    """
    statistics = targets.per_layer()
    layers = normalization_layers(model)
    if len(statistics) != len(layers):
        raise ValueError(
            f"{type(targets).__name__} has {len(statistics)} layers of statistics but "
            f"{type(model).__name__} has {len(layers)} BatchNorm layers; give one (mean, var) "
            "pair per BatchNorm layer, in model.modules() order."
        )
    for index, ((mean, var), layer) in enumerate(zip(statistics, layers, strict=True)):
        channels = layer_channels(layer)
        if mean.shape != (channels,) or var.shape != (channels,):
            raise ValueError(
                f"BatchNorm layer {index} has {channels} channels but its target statistics have "
                f"mean {tuple(mean.shape)} and var {tuple(var.shape)}; both must have shape "
                f"({channels},)."
            )
    return statistics


def batch_statistics(inputs: torch.Tensor) -> LayerStatistics:
    """Per-channel mean and biased variance of a BatchNorm input ``(N, C, *)``.

    These are the statistics BatchNorm normalizes with in training mode (it uses the biased
    variance to normalize and the unbiased one only to update its running estimate).
    """
    dims = [0, *range(2, inputs.dim())]
    var, mean = torch.var_mean(inputs, dim=dims, correction=0)
    return mean, var


class BatchNormStatistics:
    """Context manager recording each BatchNorm layer's input statistics on every forward.

    Use :func:`bn_statistics` to make one. Inside the ``with`` block every forward pass of the
    model replaces the recorded statistics (they keep their autograd graph, so the feature loss
    can be differentiated with respect to the input). On exit, also after an exception, every
    hook is removed and the recorded tensors are released.
    """

    def __init__(self, model: nn.Module, *, targets: StatisticsTargets | None = None) -> None:
        self._model = model
        self._layers = normalization_layers(model)
        if targets is None:
            targets = RunningStatistics.from_model(model)
        self._targets = check_statistics(targets, model)
        self._handles: list[RemovableHandle] = []
        self._latest: dict[int, LayerStatistics] = {}

    def __enter__(self) -> BatchNormStatistics:
        if self._handles:
            raise RuntimeError("This BatchNormStatistics is already active; it is not re-entrant.")
        try:
            # Clearing on every forward of the whole model keeps a layer that a forward skipped
            # from contributing statistics of an earlier batch.
            self._handles.append(self._model.register_forward_pre_hook(self._clear))
            for index, layer in enumerate(self._layers):
                self._handles.append(layer.register_forward_hook(self._recorder(index)))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._latest.clear()

    def _clear(self, module: nn.Module, args: tuple[object, ...]) -> None:
        self._latest.clear()

    def _recorder(self, index: int):
        def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self._latest[index] = batch_statistics(args[0])

        return record

    @property
    def num_layers(self) -> int:
        """Number of BatchNorm layers being watched."""
        return len(self._layers)

    @property
    def targets(self) -> list[LayerStatistics]:
        """The target ``(mean, var)`` per layer (copies held by the targets object)."""
        return list(self._targets)

    def batch_statistics(self) -> list[LayerStatistics]:
        """``(mean, biased var)`` of each layer's input in the latest forward pass.

        Raises
        ------
        RuntimeError
            Outside the ``with`` block, or if some BatchNorm layer did not run in the latest
            forward pass.
        """
        if not self._handles:
            raise RuntimeError("Statistics are only recorded inside the `with bn_statistics(...)` block.")
        missing = [index for index in range(len(self._layers)) if index not in self._latest]
        if missing:
            raise RuntimeError(
                f"BatchNorm layers {missing} did not run in the latest forward pass; run the model "
                "on a batch inside the `with` block before asking for statistics."
            )
        return [self._latest[index] for index in range(len(self._layers))]

    def feature_loss(self, weights: Sequence[float] | None = None) -> torch.Tensor:
        """``Σ_l w_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂)`` for the latest forward pass.

        Parameters
        ----------
        weights : Sequence[float], optional
            One weight per BatchNorm layer. Defaults to :func:`layer_weights` with
            :data:`DEFAULT_FIRST_BN_MULTIPLIER`.
        """
        if weights is None:
            weights = layer_weights(len(self._layers), first_multiplier=DEFAULT_FIRST_BN_MULTIPLIER)
        return feature_matching_loss(self.batch_statistics(), self._targets, weights=weights)


def bn_statistics(model: nn.Module, *, targets: StatisticsTargets | None = None) -> BatchNormStatistics:
    """Watch the BatchNorm layers of ``model`` for the duration of a ``with`` block.

    Parameters
    ----------
    model : nn.Module
        The network to watch; it is not modified apart from the temporary hooks.
    targets : StatisticsTargets, optional
        Statistics to match; by default a copy of ``model``'s running statistics taken now.

    Examples
    --------
    >>> with bn_statistics(teacher) as stats:          # doctest: +SKIP
    ...     logits = teacher(images)
    ...     loss = stats.feature_loss()
    """
    return BatchNormStatistics(model, targets=targets)
