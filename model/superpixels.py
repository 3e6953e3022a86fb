"""SLIC superpixels (Achanta et al., TPAMI 2012), vectorised in torch.

Each superpixel starts as a cell of a ``size``-pixel grid; at each iteration every pixel joins the
nearest of the centres of its own grid cell and the eight around it, by CIE Lab distance plus
``compactness`` × spatial distance / ``size``, and the centres move to their pixels' means. The
search window is the one SLIC uses (2 × size); superpixels are not forced to be connected.

:class:`Superpixels` cuts an interactive state's working-resolution image into them and keeps what each
looks like: the pass's pixel embedding at its centroid and its mean colour (:mod:`model.refinement`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from model.refinement import ImageState

SUPERPIXEL_CELL_SHARE = 0.5  # a superpixel's width, in logit cells
SUPERPIXEL_ITERATIONS = 3


def slic(lab: np.ndarray, size: int, compactness: float = 10.0, iterations: int = 5) -> torch.Tensor:
    """(H, W, 3) uint8 CIE Lab (OpenCV's ``COLOR_RGB2LAB``) → (H, W) int64: each pixel's superpixel,
    numbered 0.. (grid cells that end up empty leave gaps).

    Every pixel of a grid cell weighs the same nine centres, so each cell's pixels are one padded block and
    its distances one small matrix product, ``|c|² − 2 p·c`` (``|p|²`` is the same for all nine): 5x the
    nine gathered differences per pixel on a photo's working resolution, the same superpixels but for
    rounding at ties (99.99 % of the pixels)."""
    lab = torch.from_numpy(np.ascontiguousarray(lab)).float()
    height, width = lab.shape[:2]
    rows, cols = max(1, round(height / size)), max(1, round(width / size))
    grid_y, grid_x = torch.arange(height) * rows // height, torch.arange(width) * cols // width
    scale = compactness / size  # positions scaled so that the distance is a plain squared one
    ys, xs = torch.meshgrid(torch.arange(height) * scale, torch.arange(width) * scale, indexing="ij")
    features = torch.cat([lab, ys[..., None], xs[..., None]], -1).reshape(-1, 5)  # L, a, b, y, x
    labels = (grid_y[:, None] * cols + grid_x[None]).reshape(-1)
    count = rows * cols
    slot, block, origin = _cell_blocks(grid_y, grid_x, scale)
    # each cell's pixels, placed from the cell's corner (small numbers keep float32's rounding small)
    pixels = torch.cat([features, torch.zeros(1, 5)])[block] - origin  # (cells, cell pixels, 5)
    cell_rows, cell_cols = torch.arange(rows)[:, None], torch.arange(cols)[None]
    candidates = torch.stack([((cell_rows + dy).clamp(0, rows - 1) * cols + (cell_cols + dx).clamp(0, cols - 1))
                              .reshape(-1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 1)  # (cells, 9)
    centres = torch.zeros(count, 5)
    for _ in range(iterations):
        sizes = torch.bincount(labels, minlength=count).float()[:, None]
        means = torch.zeros(count, 5).index_add_(0, labels, features) / sizes.clamp(min=1)
        centres = torch.where(sizes > 0, means, centres)  # a centre left without pixels stays where it was
        near = centres[candidates] - origin  # (cells, 9, 5)
        distances = (near * near).sum(-1)[:, None] - 2 * torch.bmm(pixels, near.transpose(1, 2))
        labels = candidates.gather(1, distances.argmin(-1)).view(-1)[slot]
    return labels.reshape(height, width)


def _cell_blocks(grid_y: torch.Tensor, grid_x: torch.Tensor, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid's cells as padded blocks of pixels: each pixel's slot in the flattened (cells, block) array,
    each slot's pixel (the pixel count, one past the last, for padding), and each cell's corner (cells, 1, 5)
    in the scaled features' space."""
    rows, cols = int(grid_y[-1]) + 1, int(grid_x[-1]) + 1
    start_y, start_x = torch.searchsorted(grid_y, torch.arange(rows)), torch.searchsorted(grid_x, torch.arange(cols))
    cell_height, cell_width = int(torch.bincount(grid_y).max()), int(torch.bincount(grid_x).max())
    within_y, within_x = torch.arange(len(grid_y)) - start_y[grid_y], torch.arange(len(grid_x)) - start_x[grid_x]
    cell = grid_y[:, None] * cols + grid_x[None]
    slot = ((cell * cell_height + within_y[:, None]) * cell_width + within_x[None]).reshape(-1)
    block = torch.full((rows * cols * cell_height * cell_width,), len(slot), dtype=torch.long)
    block[slot] = torch.arange(len(slot))
    origin = torch.zeros(rows, cols, 5)
    origin[..., 3], origin[..., 4] = start_y[:, None] * scale, start_x[None] * scale
    return slot, block.view(rows * cols, -1), origin.view(rows * cols, 1, 5)


@dataclass
class Superpixels:
    """SLIC superpixels (:func:`slic`) of the working-resolution image, about
    :data:`SUPERPIXEL_CELL_SHARE` of a logit cell wide, and what each one looks like.

    Attributes:
        labels: (H', W') int64, the superpixel of each pixel.
        embedding: (N, D) the pixel embedding at each superpixel's centroid (bilinear), L2-normalised.
        colour: (N, 3) its mean CIE Lab colour, each channel in [0, 1].
        centre: (N, 2) its centroid (row, column) in working-resolution pixels.
        size: (N,) its pixel count.
    """

    labels: torch.Tensor
    embedding: torch.Tensor
    colour: torch.Tensor
    centre: torch.Tensor
    size: torch.Tensor

    @classmethod
    def of(cls, state: ImageState) -> Superpixels:
        """From an interactive state (:class:`model.refinement.ImageState`): its image and its pass's embeddings."""
        lab = cv2.cvtColor(state.image, cv2.COLOR_RGB2LAB)
        width = max(3, round(SUPERPIXEL_CELL_SHARE * lab.shape[0] / state.logits.shape[1]))
        cells = slic(lab, width, iterations=SUPERPIXEL_ITERATIONS)
        present = torch.bincount(cells.flatten()) > 0
        labels = (present.cumsum(0) - 1)[cells].to(state.logits.device)  # numbered without gaps
        flat, count = labels.flatten(), int(present.sum())
        size = torch.bincount(flat, minlength=count).float()
        mean = lambda values: torch.bincount(flat, values.flatten().float(), count) / size  # noqa: E731
        rows, cols = torch.meshgrid(torch.arange(labels.shape[0]), torch.arange(labels.shape[1]), indexing="ij")
        centre = torch.stack([mean(rows), mean(cols)], 1)
        colour = torch.stack([mean(torch.from_numpy(lab[..., k])) for k in range(3)], 1) / 255
        embedding = F.normalize(sample_at(state.embeddings, centre, labels.shape), dim=1)
        return cls(labels, embedding, colour, centre, size)

    def at(self, where: tuple[int, int]) -> int:
        return int(self.labels[where])

    def mean(self, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (embedding, colour) prototype of the superpixels in the bool ``members`` (N,), size-weighted."""
        weight = (self.size * members)[:, None]
        total = weight.sum().clamp(min=1)
        return F.normalize((self.embedding * weight).sum(0), dim=0), (self.colour * weight).sum(0) / total


def sample_at(maps: torch.Tensor, points: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """maps (C, h, w) read bilinearly, as upsampling to ``shape`` places them, at (row, column) ``points``
    (N, 2) of that shape → (N, C)."""
    grid = torch.stack([(points[:, 1] + 0.5) / shape[1], (points[:, 0] + 0.5) / shape[0]], 1) * 2 - 1
    return F.grid_sample(maps[None].float(), grid[None, None].to(maps.device), align_corners=False)[0, :, 0].T
