"""Label Studio's brush RLE, encoded from a whole label map at once.

The bytes are exactly those of ``label_studio_sdk.converter.brush.mask2rle`` (tests compare
them), which builds a string of '0'/'1' characters per run and walks every RGBA byte of every
mask. Here the label map's runs are found once; each label's mask runs follow from them, so
a label costs work in proportion to its runs, not to the image's pixels.

The format: a 32-bit count of RGBA bytes, 5 bits of word size minus one (7), four 4-bit run
size classes minus one (3, 4, 8, 16 bits), then per run a token ``1 <class:2> <length-1> <byte>``
(a single byte: ``0 00 000 <byte>``), runs over 65,536 split into 65,536-long tokens; zero
bits pad the end to a byte boundary, a whole zero byte when already aligned.
"""
from __future__ import annotations

import numpy as np

_HEADER = (32, 5, 16)
# (longest run, token bits, prefix) per run-size class: prefix 1 + 2 class bits, length bits, 8 value bits.
_CLASSES = ((8, 14, 0b100), (16, 15, 0b101), (256, 19, 0b110), (1 << 16, 27, 0b111))


def label_map_runs(label_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths, labels) of the maximal runs of equal values in row-major order."""
    flat = label_map.ravel()
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(np.append(starts, flat.size))
    return starts, lengths, flat[starts]


def rle_for_label(runs: tuple[np.ndarray, np.ndarray, np.ndarray], label: int, pixels: int) -> list[int]:
    """The brush RLE of ``label_map == label`` (255 inside, 0 outside), from :func:`label_map_runs`."""
    starts, lengths, labels = runs
    inside = labels == label
    ends = starts[inside] + lengths[inside]
    begins = starts[inside]
    # Runs of one label never touch (runs are maximal), so the mask alternates gap, inside, gap, ...
    gap_starts = np.concatenate(([0], ends))
    gap_lengths = np.concatenate((begins, [pixels])) - gap_starts
    mask_lengths = np.empty(gap_lengths.size + begins.size, np.int64)
    mask_values = np.empty_like(mask_lengths)
    mask_lengths[0::2], mask_values[0::2] = gap_lengths, 0
    mask_lengths[1::2], mask_values[1::2] = ends - begins, 255
    keep = mask_lengths > 0
    return encode_runs(mask_lengths[keep] * 4, mask_values[keep], pixels * 4)  # RGBA: each pixel 4 equal bytes


def encode_runs(lengths: np.ndarray, values: np.ndarray, total: int) -> list[int]:
    """Label Studio's RLE bytes of runs (``lengths`` of byte ``values``) making ``total`` bytes."""
    lengths, values = np.asarray(lengths, np.int64), np.asarray(values, np.int64)
    full = np.where(lengths > 1 << 16, (lengths - 1) >> 16, 0)  # 65,536-long tokens before a run's last one
    last = lengths - (full << 16)
    counts, codes = [], []
    if full.any():
        counts.append(np.full(int(full.sum()), 27))
        codes.append((0b111 << 24) | (0xFFFF << 8) | np.repeat(values, full))
    bits = np.full(last.size, 14)  # a single byte: 0 00 000 <byte>
    code = values.copy()
    shortest = 2
    for longest, size, prefix in _CLASSES:
        chosen = (last >= shortest) & (last <= longest)
        bits[chosen] = size
        code[chosen] = (prefix << (size - 3)) | ((last[chosen] - 1) << 8) | values[chosen]
        shortest = longest + 1
    if counts:  # a run's 65,536-long tokens come before its last one
        key = np.concatenate([np.repeat(np.arange(lengths.size), full), np.arange(lengths.size)])
        order = np.argsort(key, kind="stable")
        counts, codes = np.concatenate([counts[0], bits])[order], np.concatenate([codes[0], code])[order]
    else:
        counts, codes = bits, code
    header_counts = np.array(_HEADER)
    header_codes = np.array([total, 7, 0b0010_0011_0111_1111])
    return _pack(np.concatenate([header_counts, counts]), np.concatenate([header_codes, codes]))


def _pack(counts: np.ndarray, codes: np.ndarray) -> list[int]:
    """Concatenate each code's ``count`` low bits (most significant first), pad, and pack into bytes."""
    total = int(counts.sum())
    pad = 8 - total % 8  # the SDK always pads, a whole byte when aligned
    token = np.repeat(np.arange(counts.size), counts)
    position = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    shift = counts[token] - 1 - position
    stream = ((codes[token] >> shift) & 1).astype(np.uint8)
    return np.packbits(np.concatenate([stream, np.zeros(pad, np.uint8)])).tolist()
