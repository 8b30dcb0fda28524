"""Save synthesized inputs as one PNG: a row per class, so a reader sees what each class became."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def class_rows(pixels: np.ndarray, targets: np.ndarray, *, num_classes: int, per_class: int) -> np.ndarray:
    """Arrange uint8 ``(N, C, H, W)`` images into a ``(num_classes, per_class, C, H, W)`` block.

    The first ``per_class`` images of each class are used; missing ones stay black.
    """
    if pixels.ndim != 4 or pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {pixels.dtype} {pixels.shape}.")
    if len(targets) != len(pixels):
        raise ValueError(f"{len(targets)} targets for {len(pixels)} images; give one per image.")
    block = np.zeros((num_classes, per_class, *pixels.shape[1:]), dtype=np.uint8)
    for label in range(num_classes):
        chosen = pixels[targets == label][:per_class]
        block[label, : len(chosen)] = chosen
    return block


def save_class_grid(
    pixels: np.ndarray,
    targets: np.ndarray,
    path: str | Path,
    *,
    class_names: Sequence[str],
    per_class: int = 8,
    title: str = "",
) -> Path:
    """Write a grid with one row per class (labelled with ``class_names``) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    block = class_rows(pixels, np.asarray(targets), num_classes=len(class_names), per_class=per_class)
    rows, cols = block.shape[:2]
    figure, axes = plt.subplots(rows, cols, figsize=(cols * 0.8 + 1.2, rows * 0.8 + 0.4), squeeze=False)
    for row in range(rows):
        for col in range(cols):
            axis = axes[row][col]
            image = np.transpose(block[row, col], (1, 2, 0))
            if image.shape[2] == 1:
                axis.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
            else:
                axis.imshow(image)
            axis.set_xticks([])
            axis.set_yticks([])
            if col == 0:
                axis.set_ylabel(class_names[row], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
