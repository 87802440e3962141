"""Backward selection (BS): remove pixels one step at a time, keeping p(c) as high as possible.

For a batch of B images (normalised, (B, C, H, W)) and the class c each is predicted as on the
unmasked image, every step scores each remaining pixel by p(c | image with that pixel also masked)
and removes the best one (ties: lowest pixel index). A masked pixel is 0 on all channels, i.e. the
data set's mean colour. The result is the removal order (B, HW) and the p(c) curve (B, HW).

All images advance in lock-step, so at step t every image has R = HW - t candidates and the B·R
candidate images of a step are built on the model's device and scored in chunks of `chunk`
forward passes. The only host transfer is the final result.

With pixels_per_step = k > 1 (an approximation; k = 1 is exact) the k best-scoring pixels of a step
are removed together; the curve then holds p(c) after the whole step for each of those k removals,
from one extra forward pass of the new masked images.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

def widen(logits: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 or wider: half-precision logits are upcast, float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


ForwardFunc = Callable[[torch.Tensor], torch.Tensor]  # (N, C, H, W) normalised -> (N, K) logits
ProgressFunc = Callable[[int, int], None]  # (pixels removed so far, HW) per step


@dataclass
class SelectionResult:
    """Backward selection on B images of HW pixels (tensors on the engine's device)."""

    order: torch.Tensor  # (B, HW) int64 pixel indices (row-major y*W+x), earliest removal first
    curve: torch.Tensor  # (B, HW) float32 p(c) after each removal
    pred: torch.Tensor  # (B,) int64 predicted class c on the unmasked image
    confidence: torch.Tensor  # (B,) float32 p(c) on the unmasked image
    forward_passes: int  # candidate images scored (excludes the initial prediction)

    def cpu(self) -> "SelectionResult":
        return SelectionResult(self.order.cpu(), self.curve.cpu(), self.pred.cpu(), self.confidence.cpu(), self.forward_passes)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs; none of these change the exact fp32 result (autocast excepted).

    chunk: candidates per forward pass; None sizes it from memory_bytes.
    memory_bytes: budget for one chunk's inputs and activations; None = 1 GiB on CPU,
        a quarter of the free memory on CUDA.
    channels_last: build candidates directly in NHWC memory (faster convolutions on most devices).
    autocast: None (exact fp32), "bf16" or "fp16" — CUDA only; an approximation, see BENCHMARKS.md.
    compile: wrap the model in torch.compile (chunks are padded to one static size).
    """

    chunk: Optional[int] = None
    memory_bytes: Optional[int] = None
    channels_last: bool = True
    autocast: Optional[str] = None
    compile: bool = False

    def __post_init__(self):
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if self.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {self.autocast!r}")


def activation_bytes_per_image(model: nn.Module, sample: torch.Tensor) -> int:
    """Bytes of every leaf module's output for one image: a generous bound on inference memory."""
    total = sample[:1].numel() * sample.element_size()
    hooks = []

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    for m in model.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    return total


def auto_chunk(forward: ForwardFunc, sample: torch.Tensor, memory_bytes: Optional[int] = None) -> int:
    """Candidates per forward pass that fit the memory budget (see EngineConfig)."""
    if memory_bytes is None:
        if sample.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(sample.device)
            memory_bytes = free // 4
        else:
            memory_bytes = 1 << 30
    per_image = activation_bytes_per_image(forward, sample) if isinstance(forward, nn.Module) else 64 * sample[:1].numel() * 4
    return int(max(1, min(65536, memory_bytes // max(per_image, 1))))


class Scorer:
    """Scores candidates: p(target | candidate) for a stack of masked images, in fp32.

    Holds the forward function prepared once (eval mode, optional compile/autocast).
    """

    def __init__(self, forward: ForwardFunc, config: EngineConfig, chunk: int, device: torch.device):
        self.config, self.chunk, self.device = config, chunk, device
        self.forward = torch.compile(forward) if config.compile else forward
        if config.autocast is not None and device.type != "cuda":
            raise ValueError("autocast (bf16/fp16) is supported on CUDA only; drop it on CPU")

    def _autocast(self):
        if self.config.autocast is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.autocast == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K) softmax probabilities in fp32."""
        with self._autocast():
            logits = self.forward(x)
        return torch.softmax(widen(logits), dim=1)

    def target_probs(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W), (N,) -> (N,) p(target). Pads to `chunk` rows when compiled (static shape)."""
        n = x.shape[0]
        if self.config.compile and n < self.chunk:
            pad = x[:1].expand(self.chunk - n, *x.shape[1:])
            x = torch.cat([x, pad])
        return self.probs(x)[:n].gather(1, target[:, None]).squeeze(1)


def _score_step(scorer: Scorer, x_nhwc: torch.Tensor, remaining: torch.Tensor, target: torch.Tensor, shape) -> torch.Tensor:
    """p(c) for every (image, remaining pixel) candidate of one step.

    x_nhwc: (B, HW, C) current masked images; remaining: (B, R) pixel indices, ascending.
    Returns (B, R) scores. Candidates are built per chunk on the device: gather the image, zero one
    pixel (all channels) — no host round trip.
    """
    B, R = remaining.shape
    C, H, W = shape
    n = B * R
    scores = torch.empty(n, device=x_nhwc.device, dtype=torch.promote_types(x_nhwc.dtype, torch.float32))
    flat_pixel = remaining.reshape(-1)  # (B*R,)
    for start in range(0, n, scorer.chunk):
        stop = min(start + scorer.chunk, n)
        idx = torch.arange(start, stop, device=x_nhwc.device)
        b = torch.div(idx, R, rounding_mode="floor")
        cand = x_nhwc[b]  # (M, HW, C) copy of each candidate's image
        cand[torch.arange(stop - start, device=cand.device), flat_pixel[start:stop]] = 0.0
        imgs = cand.view(-1, H, W, C).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
        if not scorer.config.channels_last:
            imgs = imgs.contiguous()
        scores[start:stop] = scorer.target_probs(imgs, target[b])
    return scores.view(B, R)


def backward_selection(
    forward: ForwardFunc,
    images: torch.Tensor,
    *,
    pixels_per_step: int = 1,
    config: EngineConfig = EngineConfig(),
    target: Optional[torch.Tensor] = None,
    progress: Optional[ProgressFunc] = None,
) -> SelectionResult:
    """Run backward selection on a batch of images until every pixel is masked.

    Args:
        forward: the model (or any callable) mapping normalised (N, C, H, W) to logits (N, K);
            put it in eval mode and on the images' device first.
        images: (B, C, H, W) normalised float images on the model's device (their dtype is kept).
        pixels_per_step: k pixels removed per step; 1 is exact BS, k > 1 an approximation.
        config: chunking, memory format, autocast and compile (see EngineConfig).
        target: (B,) class to explain; default the predicted class.
        progress: called after every step with (pixels removed, HW).

    Returns:
        SelectionResult with order/curve (B, HW) on the images' device.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if pixels_per_step < 1:
        raise ValueError(f"pixels_per_step must be >= 1, got {pixels_per_step}")
    device = images.device
    B, C, H, W = images.shape
    HW = H * W
    chunk = config.chunk or auto_chunk(forward, images, config.memory_bytes)
    scorer = Scorer(forward, config, chunk, device)
    order = torch.empty(B, HW, dtype=torch.long, device=device)
    curve = torch.empty(B, HW, dtype=torch.float32, device=device)
    rows = torch.arange(B, device=device)[:, None]
    if not images.is_floating_point():
        raise ValueError("images must be normalised floats (see overinterp.data.normalize), got integers")
    with torch.inference_mode():
        x = images.permute(0, 2, 3, 1).reshape(B, HW, C).clone()  # (B, HW, C) current masked images
        probs = scorer.probs(images.contiguous(memory_format=torch.channels_last) if config.channels_last else images)
        confidence, pred = probs.max(1)
        if target is None:
            target = pred
        else:
            target = target.to(device).long()
            confidence = probs.gather(1, target[:, None]).squeeze(1)
        remaining = torch.arange(HW, device=device).expand(B, HW).clone()  # (B, R) ascending pixel ids
        removed, passes = 0, 0
        while removed < HW:
            R = HW - removed
            scores = _score_step(scorer, x, remaining, target, (C, H, W))  # (B, R)
            passes += B * R
            k = min(pixels_per_step, R)
            if k == 1:
                best_score, pos = scores.max(1, keepdim=True)  # first max = lowest pixel id (ascending)
            else:
                # stable descending sort keeps equal scores in ascending pixel order
                pos = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
            chosen = remaining.gather(1, pos)  # (B, k) pixel ids
            x[rows, chosen] = 0.0
            order[:, removed : removed + k] = chosen
            if k == 1:
                curve[:, removed : removed + 1] = best_score
            else:
                imgs = x.view(B, H, W, C).permute(0, 3, 1, 2)
                curve[:, removed : removed + k] = scorer.target_probs(imgs, target)[:, None]
                passes += B
            keep = torch.ones_like(remaining, dtype=torch.bool).scatter_(1, pos, False)
            remaining = remaining[keep].view(B, R - k)  # boolean gather preserves ascending order
            removed += k
            if progress is not None:
                progress(removed, HW)
    return SelectionResult(order, curve, pred, confidence, passes)


def brute_force_backward_selection(forward: ForwardFunc, image: torch.Tensor) -> tuple[list[int], list[float]]:
    """The reference twin: one image (C, H, W), one candidate per forward pass, plain Python.

    Exists for tests: every fast path must reproduce its order exactly.
    """
    C, H, W = image.shape
    with torch.inference_mode():
        probs = torch.softmax(widen(forward(image[None])), 1)[0]
        c = int(probs.argmax())
        x = image.clone()
        remaining = list(range(H * W))
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


def steps_for(hw: int, pixels_per_step: int) -> int:
    """Sequential steps BS takes on HW pixels."""
    return math.ceil(hw / pixels_per_step)
