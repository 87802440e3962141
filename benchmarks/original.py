"""The paper's original backward-selection strategy, re-implemented as the speed baseline.

Faithful to how the original code spends its time: one image at a time; at every step the
candidate images (the current masked image with one more pixel masked, one per remaining pixel)
are built on the host in NumPy, copied to the device, scored in forward passes of 128, and the
argmax is taken on the host. It produces the same order as the engine (ties: lowest pixel index)
and exists to be measured against, in bench_backselect.py. Do not use it for work.
"""

from __future__ import annotations

import numpy as np
import torch

ORIGINAL_CHUNK = 128  # candidates per forward pass in the original code


def original_backward_selection(model, image: np.ndarray, device: torch.device, max_steps: int | None = None):
    """BS on one normalised image (C, H, W) float32 NumPy array, the original way.

    Args:
        max_steps: stop after this many removals (for timing the first steps of a large image).
    Returns:
        (order, curve, forward_passes): removal order and p(c) after each removal, as NumPy arrays.
    """
    C, H, W = image.shape
    HW = H * W
    with torch.no_grad():
        logits = model(torch.from_numpy(image[None]).to(device))
        c = int(torch.softmax(logits, 1).argmax(1).item())
    current = image.copy()
    remaining = list(range(HW))
    order, curve, passes = [], [], 0
    steps = HW if max_steps is None else min(HW, max_steps)
    for _ in range(steps):
        # host: every candidate = current image with one more pixel zeroed on all channels
        cands = np.repeat(current[None], len(remaining), axis=0)  # (R, C, H, W)
        rows = np.array(remaining) // W
        cols = np.array(remaining) % W
        cands[np.arange(len(remaining)), :, rows, cols] = 0.0
        scores = []
        with torch.no_grad():
            for s in range(0, len(cands), ORIGINAL_CHUNK):
                batch = torch.from_numpy(cands[s : s + ORIGINAL_CHUNK]).to(device)  # host -> device copy
                p = torch.softmax(model(batch), 1)[:, c]
                scores.append(p.cpu().numpy())  # device -> host copy
        scores = np.concatenate(scores)
        passes += len(remaining)
        best = int(np.argmax(scores))  # first max = lowest remaining pixel id
        pixel = remaining.pop(best)
        current[:, pixel // W, pixel % W] = 0.0
        order.append(pixel)
        curve.append(float(scores[best]))
    return np.array(order), np.array(curve, dtype=np.float32), passes
