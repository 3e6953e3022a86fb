"""SLIC superpixels (model/superpixels.py) against SLIC's assignment step written pixel by pixel."""
import cv2
import numpy as np
import pytest
import torch

from demo import world
from model.superpixels import slic


def reference_slic(lab: np.ndarray, size: int, compactness: float, iterations: int) -> torch.Tensor:
    """Each pixel joins the nearest of its own grid cell's centre and the eight around it (squared Lab
    distance plus (compactness / size)² × squared spatial distance); the centres move to their pixels' means."""
    lab = torch.from_numpy(lab).double()
    height, width = lab.shape[:2]
    rows, cols = max(1, round(height / size)), max(1, round(width / size))
    grid_y, grid_x = torch.arange(height) * rows // height, torch.arange(width) * cols // width
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    features = torch.cat([lab, ys[..., None], xs[..., None]], -1).reshape(-1, 5)
    weights = torch.tensor([1.0, 1.0, 1.0, (compactness / size) ** 2, (compactness / size) ** 2], dtype=torch.float64)
    labels = (grid_y[:, None] * cols + grid_x[None]).reshape(-1)
    centres = torch.zeros(rows * cols, 5, dtype=torch.float64)
    for _ in range(iterations):
        for cell in range(rows * cols):
            if (labels == cell).any():
                centres[cell] = features[labels == cell].mean(0)
        new = torch.empty_like(labels)
        for pixel, (y, x) in enumerate(zip(ys.flatten(), xs.flatten(), strict=True)):
            near = [int(r * cols + c) for r in range(max(0, int(grid_y[y]) - 1), min(rows, int(grid_y[y]) + 2))
                    for c in range(max(0, int(grid_x[x]) - 1), min(cols, int(grid_x[x]) + 2))]
            new[pixel] = near[int((((features[pixel] - centres[near]) ** 2) * weights).sum(1).argmin())]
        labels = new
    return labels.reshape(height, width)


@pytest.mark.parametrize("size", [3, 5, 8])
def test_slic_assigns_each_pixel_to_the_nearest_of_the_nine_centres_around_it(size):
    scene = cv2.resize(world.test_scenes(1, seed=size)[0][0], (45, 38), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(scene, cv2.COLOR_RGB2LAB)
    ours, reference = slic(lab, size, iterations=3), reference_slic(lab, size, 10.0, 3)
    assert ours.shape == (38, 45) and ours.dtype == torch.int64
    assert (ours == reference).float().mean() >= 0.995  # ties may round the other way in float32
