"""Reference twins of fast code, in plain Python: slow, obviously right, and what the tests compare
the engines with."""

from typing import Sequence

import torch

from overinterp.selection.engine import ForwardFunc, widen


def brute_force_backward_selection(forward: ForwardFunc, image: torch.Tensor, masked: Sequence[int] = ()) -> tuple[list[int], list[float]]:
    """The reference twin: one image (C, H, W), one candidate per forward pass, plain Python.

    masked: pixel ids already removed (set to 0, never candidates) — the state an exact tail starts
    from; the class c is still the one predicted on the unmasked image.
    Returns the order and curve of the pixels not in `masked`. Every fast path must reproduce its
    order exactly.
    """
    C, H, W = image.shape
    with torch.inference_mode():
        probs = torch.softmax(widen(forward(image[None])), 1)[0]
        c = int(probs.argmax())
        x = image.clone()
        gone = set(masked)
        for p in gone:
            x[:, p // W, p % W] = 0.0
        remaining = [p for p in range(H * W) if p not in gone]
        order, curve = [], []
        while remaining:
            best, best_p = None, -1.0
            for p in remaining:
                cand = x.clone()
                cand[:, p // W, p % W] = 0.0
                val = float(torch.softmax(widen(forward(cand[None])), 1)[0, c])
                if val > best_p:  # strict: ties keep the lowest pixel id
                    best, best_p = p, val
            x[:, best // W, best % W] = 0.0
            remaining.remove(best)
            order.append(best)
            curve.append(best_p)
    return order, curve
