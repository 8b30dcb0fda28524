"""Model registry: small networks with BatchNorm for 28×28 and 32×32 images.

Every model takes ``in_channels``, ``num_classes`` and ``image_size`` so one registry serves
MNIST-shaped and CIFAR-shaped data. Teachers keep BatchNorm on purpose: the data-free
synthesizers invert its running statistics. The exception is ``tanh_cnn``, the DP-SGD teacher
(``privacy=dpsgd``): no normalization layer, tanh activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

ModelFactory = Callable[..., nn.Module]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Two 5×5 conv blocks with BatchNorm, global average pooling, one linear layer (≈ 20 k params)."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, 16, 5),
            nn.MaxPool2d(2),
            _conv_bn_relu(16, 32, 5),
            nn.MaxPool2d(2),
            _conv_bn_relu(32, 64, 3),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(inputs), 1))


class LeNet5BN(nn.Module):
    """LeNet-5 with BatchNorm after each convolution (the DAFL/DFAD MNIST teacher family).

    ``width=0.5`` gives LeNet-5-half, the student of DAFL and DFAD: half the channels and
    hidden units of every layer. ``batch_norm=False`` gives their exact networks, which have none.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        width: float = 1.0,
        batch_norm: bool = True,
        batch_norm_head: bool = False,
    ) -> None:
        super().__init__()
        conv1, conv2, fc1, fc2 = (max(1, round(units * width)) for units in (6, 16, 120, 84))
        # LeNet-5 was designed for 32×32 inputs; padding 28×28 by 2 keeps its 5×5 feature map.
        padding = max(0, (32 - image_size) // 2)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, conv1, 5, padding=padding, bias=not batch_norm),
            nn.BatchNorm2d(conv1) if batch_norm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(conv1, conv2, 5, bias=not batch_norm),
            nn.BatchNorm2d(conv2) if batch_norm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = ((image_size + 2 * padding - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Linear(conv2 * side * side, fc1, bias=not batch_norm_head),
            nn.BatchNorm1d(fc1) if batch_norm_head else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(fc1, fc2, bias=not batch_norm_head),
            nn.BatchNorm1d(fc2) if batch_norm_head else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(fc2, num_classes),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(inputs), 1))


class FCHeadCNN(nn.Module):
    """Two 5×5 conv blocks and a 128-unit fully connected head (≈ 0.2 M params, ≈ 3 M MACs).

    Cheap to run but with enough weights that sending it (FedAvg) costs far more than
    sending soft labels — the default student.
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, 16, 5),
            nn.MaxPool2d(2),
            _conv_bn_relu(16, 32, 5),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(inputs))


class MediumCNN(nn.Module):
    """Four 3×3 conv blocks with BatchNorm and a 128-unit head (≈ 0.4 M params for 28×28)."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, 32, 3),
            _conv_bn_relu(32, 32, 3),
            nn.MaxPool2d(2),
            _conv_bn_relu(32, 64, 3),
            _conv_bn_relu(64, 64, 3),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(inputs))


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(inputs)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(inputs))


class ResNetCifar(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, §4.2): depth = 6n + 2, widths 16/32/64."""

    def __init__(self, *, depth: int = 8, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2 (8, 14, 20, …), got {depth}.")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        channels = 16
        for stage, width in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(_BasicBlock(channels, width, stride))
                channels = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.stages(self.stem(inputs)))
        return self.classifier(torch.flatten(out, 1))


class MLP(nn.Module):
    """Two hidden layers with BatchNorm1d; a weak but fast baseline."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)


class TanhCNN(nn.Sequential):
    """Papernot et al.'s tanh CNN for MNIST ("Tempered Sigmoid Activations for Deep Learning with
    Differential Privacy", AAAI 2021), as in Tramèr & Boneh's ``MNIST_CNN`` (ICLR 2021): two
    strided convolutions and a 32-unit hidden layer, all with tanh (≈ 26 k params for 28×28).

    Built for DP-SGD: tanh bounds the activations, so clipped per-example gradients lose less
    signal than with ReLU, and without a normalization layer per-example gradients need no
    GroupNorm stand-in. A ``Sequential`` (indexable) whose layers are created in the same order as
    the reference code, so a seed gives the same initial weights.
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        side = (image_size + 2 * 2 - 8) // 2 + 1 - 1  # first convolution, then a 2×2 stride-1 pool
        side = (side - 4) // 2 + 1 - 1  # second convolution and pool: 28 → 13 → 12 → 5 → 4
        super().__init__(
            nn.Conv2d(in_channels, 16, kernel_size=8, stride=2, padding=2),
            nn.Tanh(),
            nn.MaxPool2d(kernel_size=2, stride=1),
            nn.Conv2d(16, 32, kernel_size=4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(kernel_size=2, stride=1),
            nn.Flatten(),
            nn.Linear(32 * side * side, 32),
            nn.Tanh(),
            nn.Linear(32, num_classes),
        )


MODEL_REGISTRY: dict[str, ModelFactory] = {
    "cnn_small": SmallCNN,
    "lenet5_bn": LeNet5BN,
    "lenet5_half": lambda **kw: LeNet5BN(width=0.5, **kw),
    "lenet5_bn4": lambda **kw: LeNet5BN(batch_norm_head=True, **kw),
    "lenet5_half_plain": lambda **kw: LeNet5BN(width=0.5, batch_norm=False, **kw),
    "cnn_fc": FCHeadCNN,
    "cnn_medium": MediumCNN,
    "resnet8": lambda **kw: ResNetCifar(depth=8, **kw),
    "resnet20": lambda **kw: ResNetCifar(depth=20, **kw),
    "mlp": MLP,
    "tanh_cnn": TanhCNN,
}
# Registered models without BatchNorm or GroupNorm: data-free synthesis has nothing to invert.
NORMALIZATION_FREE_MODELS = frozenset({"tanh_cnn", "lenet5_half_plain"})


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(MODEL_REGISTRY)


def check_model_name(name: str) -> str:
    """Return ``name`` if it is registered, else raise a ``ValueError`` naming the choices."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"Unknown model {name!r}; choose one of {available_models()}.")
    return name


def build_model(name: str, *, input_shape: Sequence[int], num_classes: int, seed: int | None = None) -> nn.Module:
    """Instantiate a registered model for inputs of shape ``(C, H, W)``.

    Parameters
    ----------
    name : str
        A registry name, see :func:`available_models`.
    input_shape : Sequence[int]
        ``(channels, height, width)``; height must equal width.
    num_classes : int
        Number of output logits.
    seed : int, optional
        Seeds the initial weights without touching the global RNG stream of the caller.
    """
    channels, height, width = input_shape
    if height != width:
        raise ValueError(f"Models expect square images, got {height}×{width}.")
    factory = MODEL_REGISTRY[check_model_name(name)]
    if seed is None:
        model = factory(in_channels=channels, num_classes=num_classes, image_size=height)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory(in_channels=channels, num_classes=num_classes, image_size=height)
    # Channels-last convolution weights are oneDNN's preferred layout on CPU: a teacher's local
    # training runs about 1.3× faster (benchmarks/channels_last.py). The same function; only the
    # float rounding differs. Weights travel and are stored in the usual (logical) order.
    return with_layout(model, torch.channels_last)


def with_layout(model: nn.Module, layout: torch.memory_format) -> nn.Module:
    """``model``, its convolution weights (every 4-D parameter) moved to ``layout`` in place:
    ``nn.Module.to(memory_format=…)``, which its type annotations leave out."""
    for parameter in model.parameters():
        if parameter.dim() == 4:
            parameter.data = parameter.data.contiguous(memory_format=layout)
    return model


def model_for_client(architectures: Sequence[str], client_id: int) -> str:
    """Architecture of client ``client_id``: the list is assigned round-robin by client id."""
    if not architectures:
        raise ValueError("client_models is empty; give at least one architecture name.")
    return architectures[client_id % len(architectures)]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
