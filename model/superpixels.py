"""SLIC superpixels (Achanta et al., TPAMI 2012), vectorised in torch.

Each superpixel starts as a cell of a ``size``-pixel grid; at each iteration every pixel joins the
nearest of the centres of its own grid cell and the eight around it, by CIE Lab distance plus
``compactness`` × spatial distance / ``size``, and the centres move to their pixels' means. The
search window is the one SLIC uses (2 × size); superpixels are not forced to be connected.
"""
from __future__ import annotations

import numpy as np
import torch


def slic(lab: np.ndarray, size: int, compactness: float = 10.0, iterations: int = 5) -> torch.Tensor:
    """(H, W, 3) uint8 CIE Lab (OpenCV's ``COLOR_RGB2LAB``) → (H, W) int64: each pixel's superpixel,
    numbered 0.. (grid cells that end up empty leave gaps)."""
    lab = torch.from_numpy(np.ascontiguousarray(lab)).float()
    height, width = lab.shape[:2]
    rows, cols = max(1, round(height / size)), max(1, round(width / size))
    grid_y = torch.arange(height) * rows // height
    grid_x = torch.arange(width) * cols // width
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    features = torch.cat([lab, ys[..., None], xs[..., None]], -1).reshape(-1, 5)  # L, a, b, y, x
    labels = (grid_y[:, None] * cols + grid_x[None]).reshape(-1)
    count = rows * cols
    weights = torch.tensor([1.0, 1.0, 1.0, compactness / size, compactness / size]) ** 2
    candidates = [((grid_y[:, None] + dy).clamp(0, rows - 1) * cols + (grid_x[None] + dx).clamp(0, cols - 1))
                  .reshape(-1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    centres = torch.zeros(count, 5)
    for _ in range(iterations):
        sizes = torch.bincount(labels, minlength=count).float()[:, None]
        means = torch.zeros(count, 5).index_add_(0, labels, features) / sizes.clamp(min=1)
        centres = torch.where(sizes > 0, means, centres)  # a centre left without pixels stays where it was
        distances = torch.stack([((features - centres[c]) ** 2 * weights).sum(1) for c in candidates])
        labels = torch.stack(candidates).gather(0, distances.argmin(0, keepdim=True))[0]
    return labels.reshape(height, width)
