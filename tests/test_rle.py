"""Our brush RLE must be label-studio-sdk's, byte for byte: the SDK is the oracle."""
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from backend.control_tags.rle import label_map_runs, rle_for_label
from demo import world


def ours(label_map: np.ndarray, label: int) -> list[int]:
    return rle_for_label(label_map_runs(label_map), label, label_map.size)


def one_pixel():
    mask = np.zeros((9, 11), np.int64)
    mask[4, 5] = 1
    return mask


@pytest.mark.parametrize("mask", [
    np.zeros((5, 7), np.int64), np.ones((5, 7), np.int64), np.zeros((1, 1), np.int64), np.ones((1, 1), np.int64),
    one_pixel(), np.ones((300, 301), np.int64),  # one run of 361,200 bytes: many 65,536-long tokens
], ids=["empty", "full", "one-pixel-image-empty", "one-pixel-image-full", "one-pixel", "long-run"])
def test_edge_cases_match_the_sdk(mask):
    expected = mask2rle(mask.astype(np.uint8) * 255)
    assert ours(mask, 1) == expected
    assert np.array_equal(np.asarray(decode_rle(expected)).reshape(*mask.shape, 4)[..., 3] > 127, mask == 1)


def test_random_masks_of_odd_sizes_and_densities_match_the_sdk():
    rng = np.random.default_rng(0)
    for _ in range(60):
        height, width = rng.integers(1, 90, 2)
        labels = rng.integers(1, 5)
        # Blocky or noisy maps: runs from 1 pixel to whole rows.
        coarse = rng.integers(0, labels, (max(1, height // rng.integers(1, 9)), max(1, width // rng.integers(1, 9))))
        label_map = np.kron(coarse, np.ones((9, 9), np.int64))[:height, :width]
        label_map = np.pad(label_map, ((0, height - label_map.shape[0]), (0, width - label_map.shape[1])), mode="edge")
        for label in range(labels):
            assert ours(label_map, label) == mask2rle((label_map == label).astype(np.uint8) * 255), (height, width)


def test_real_label_maps_match_the_sdk_for_every_label():
    for _, truth in world.test_scenes(4, seed=99):
        label_map = truth.astype(np.int16)
        runs = label_map_runs(label_map)
        for label in np.unique(label_map):
            assert rle_for_label(runs, int(label), label_map.size) == mask2rle((label_map == label).astype(np.uint8) * 255)
