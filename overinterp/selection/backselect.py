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
from one extra forward pass of the new masked images. Pixels removed in one step are listed in
ascending pixel index: they left together, so no order among them exists, and this canonical
order is what the Parquet store keeps (it stores the step of each pixel, see overinterp/store.py).

With exact_tail = F < 1 the k-steps stop when ceil(F·HW) pixels remain and exact BS (k = 1)
removes the rest: the paper uses only the tail of the order (the 5% subset, an SIS), while the
first steps, which remove pixels that hardly matter, cost most of the passes. The step plan and its
cost in forward passes are in selection/cost.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from overinterp.selection.cost import check_selector_args, step_plan


def widen(logits: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 or wider: half-precision logits are upcast, float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def explained_class(probs: torch.Tensor, target: Optional[torch.Tensor]):
    """(target, confidence, pred) from the unmasked images' probabilities (B, K).

    target defaults to the predicted class; confidence is p(target) on the unmasked image.
    """
    confidence, pred = probs.max(1)
    if target is not None:
        target = target.to(probs.device).long()
        confidence = probs.gather(1, target[:, None]).squeeze(1)
    return (pred if target is None else target), confidence, pred


ForwardFunc = Callable[[torch.Tensor], torch.Tensor]  # (N, C, H, W) normalised -> (N, K) logits
ProgressFunc = Callable[[int, int], None]  # (pixels removed so far, HW) per step
# forward passes just made (images evaluated, a Python int the engine counts anyway: no host sync),
# called per step or chunk, so a long batch can report progress before it returns; the calls sum
# to SelectionResult.forward_passes
PassesFunc = Callable[[int], None]


@dataclass
class SelectionResult:
    """Backward selection on B images of HW pixels (tensors on the engine's device)."""

    order: torch.Tensor  # (B, HW) int64 pixel indices (row-major y*W+x), earliest removal first
    curve: torch.Tensor  # (B, HW) float32 p(c) after each removal
    pred: torch.Tensor  # (B,) int64 predicted class c on the unmasked image
    confidence: torch.Tensor  # (B,) float32 p(c) on the unmasked image
    # images the model evaluated for the selection (all B images together): candidates, re-scores
    # of k-steps, gradient-step forwards — everything after the one prediction per unmasked image
    # (and the chunk autotuner's timing runs); selection/cost.py gives it in advance
    forward_passes: int
    # pixels removed at each step, shared by the batch (lock-step); sums to the pixels removed.
    # Within a step `order` is ascending by pixel id and `curve` is constant (p(c) after the step).
    step_sizes: tuple[int, ...] = ()
    backward_passes: int = 0  # images back-propagated (bgsis: one per image per gradient step)

    def cpu(self) -> "SelectionResult":
        return dataclasses.replace(self, order=self.order.cpu(), curve=self.curve.cpu(), pred=self.pred.cpu(),
                                   confidence=self.confidence.cpu())


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs; none of these change the exact fp32 result (autocast excepted).

    chunk: candidates per forward pass; None autotunes it (`tune_chunk`): the fastest measured
        batch size within the memory budget.
    memory_bytes: budget for one chunk's inputs and activations; None = 1 GiB on CPU,
        a quarter of the free memory on CUDA.
    channels_last: build candidates directly in NHWC memory and convert the model's weights to
        channels_last (in place) — 2x faster convolutions on this project's CPUs.
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


def max_chunk(forward: ForwardFunc, sample: torch.Tensor, memory_bytes: Optional[int] = None) -> int:
    """The most candidates per forward pass that fit the memory budget (see EngineConfig)."""
    if memory_bytes is None:
        if sample.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(sample.device)
            memory_bytes = free // 4
        else:
            memory_bytes = 1 << 30
    per_image = activation_bytes_per_image(forward, sample) if isinstance(forward, nn.Module) else 64 * sample[:1].numel() * 4
    return int(max(1, min(65536, memory_bytes // max(per_image, 1))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(forward: ForwardFunc, sample: torch.Tensor, batch: int, channels_last: bool, repeats: int = 2) -> float:
    """Images per second of plain inference at one batch size (best of `repeats`, after a warm-up)."""
    x = sample[:1].expand(batch, *sample.shape[1:])
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    best = 0.0
    with torch.inference_mode():
        forward(x)
        for _ in range(repeats):
            _sync(sample.device)
            t0 = time.perf_counter()
            forward(x)
            _sync(sample.device)
            best = max(best, batch / (time.perf_counter() - t0))
    return best


_TUNED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # forward -> {setting: chunk}


def tune_chunk(forward: ForwardFunc, sample: torch.Tensor, limit: int, channels_last: bool) -> int:
    """The fastest batch size among powers of two up to `limit` (CPU caches favour ~128 for a
    ResNet20; GPUs favour the largest). A larger size must be 3% faster to be preferred.

    Measured once per (forward, image shape, dtype, device, limit, memory format) and cached.
    """
    key = (tuple(sample.shape[1:]), sample.dtype, str(sample.device), limit, channels_last, torch.is_autocast_enabled())
    try:
        cache = _TUNED.setdefault(forward, {})
    except TypeError:  # not weak-referenceable: measure every time
        cache = {}
    if key not in cache:
        cache[key] = _measure_best_chunk(forward, sample, limit, channels_last)
    return cache[key]


def _measure_best_chunk(forward: ForwardFunc, sample: torch.Tensor, limit: int, channels_last: bool) -> int:
    best, best_rate, size = 1, 0.0, 8
    while size <= limit:
        rate = forward_rate(forward, sample, size, channels_last)
        if rate > 1.03 * best_rate:
            best, best_rate = size, rate
        elif size >= 4 * best:  # two doublings without a gain: past the peak
            break
        size *= 2
    return best if best_rate else limit  # limit < 8: nothing measured, take the largest that fits


class Scorer:
    """Scores candidates: p(target | candidate) for a stack of masked images, in fp32 or wider.

    Holds the forward function prepared once: channels_last weights, a chunk size tuned on the
    eager model, then (optionally) torch.compile at that one static size — every call is padded to
    it, so the model compiles once.
    """

    def __init__(self, forward: ForwardFunc, config: EngineConfig, sample: torch.Tensor):
        self.config, self.device = config, sample.device
        if config.autocast is not None and self.device.type != "cuda":
            raise ValueError("autocast (bf16/fp16) is supported on CUDA only; drop it on CPU")
        if config.channels_last and isinstance(forward, nn.Module):
            forward.to(memory_format=torch.channels_last)
        if config.chunk is not None:
            self.chunk = config.chunk
        else:
            with self._autocast():
                self.chunk = tune_chunk(forward, sample, max_chunk(forward, sample, config.memory_bytes), config.channels_last)
        self.forward = compiled(forward) if config.compile else forward

    def _autocast(self):
        if self.config.autocast is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.autocast == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """x in the memory format the model was prepared for."""
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x.contiguous()

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K) softmax probabilities (fp32 or wider)."""
        if not self.config.compile:
            with self._autocast():
                return torch.softmax(widen(self.forward(x)), dim=1)
        out = []
        for start in range(0, x.shape[0], self.chunk):  # static shape: pad every call to `chunk`
            part = x[start : start + self.chunk]
            m = part.shape[0]
            if m < self.chunk:
                part = torch.cat([part, part[:1].expand(self.chunk - m, *part.shape[1:])])
            with self._autocast():
                out.append(torch.softmax(widen(self.forward(self.layout(part))), dim=1)[:m])
        return torch.cat(out)

    def target_probs(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W), (N,) -> (N,) p(target)."""
        return self.probs(x).gather(1, target[:, None]).squeeze(1)


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled(forward: ForwardFunc) -> ForwardFunc:
    """torch.compile(forward) once per model object (compiling costs ~30 s on a CPU)."""
    if forward not in _COMPILED:
        _COMPILED[forward] = torch.compile(forward, dynamic=False)
    return _COMPILED[forward]


def _score_step(scorer: Scorer, x_nhwc: torch.Tensor, remaining: torch.Tensor, target: torch.Tensor, shape,
                on_passes: Optional[PassesFunc] = None) -> torch.Tensor:
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
    # balanced chunks: 1,030 candidates at chunk 512 run as 3 x 344, not 512 + 512 + 6; compiled
    # models keep one static size instead (Scorer.probs pads the last chunk)
    size = scorer.chunk if scorer.config.compile else math.ceil(n / math.ceil(n / scorer.chunk))
    for start in range(0, n, size):
        stop = min(start + size, n)
        idx = torch.arange(start, stop, device=x_nhwc.device)
        b = torch.div(idx, R, rounding_mode="floor")
        cand = x_nhwc[b]  # (M, HW, C) copy of each candidate's image
        cand[torch.arange(stop - start, device=cand.device), flat_pixel[start:stop]] = 0.0
        imgs = cand.view(-1, H, W, C).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
        if not scorer.config.channels_last:
            imgs = imgs.contiguous()
        scores[start:stop] = scorer.target_probs(imgs, target[b])
        if on_passes is not None:  # per chunk: one step of a 224-px image is minutes of CPU
            on_passes(stop - start)
    return scores.view(B, R)


def backward_selection(
    forward: ForwardFunc,
    images: torch.Tensor,
    *,
    pixels_per_step: int = 1,
    exact_tail: float = 1.0,
    config: EngineConfig = EngineConfig(),
    target: Optional[torch.Tensor] = None,
    progress: Optional[ProgressFunc] = None,
    max_steps: Optional[int] = None,
    on_passes: Optional[PassesFunc] = None,
) -> SelectionResult:
    """Run backward selection on a batch of images until every pixel is masked.

    Args:
        forward: the model (or any callable) mapping normalised (N, C, H, W) to logits (N, K);
            put it in eval mode and on the images' device first.
        images: (B, C, H, W) normalised float images on the model's device (their dtype is kept).
        pixels_per_step: k pixels removed per step; 1 is exact BS, k > 1 an approximation.
        exact_tail: F in (0, 1]. F < 1: remove k per step until ceil(F·HW) pixels remain (the last
            k-step shrunk to land there), then exact BS (k = 1) to the end. F = 1 (default): k per
            step to the end — bit for bit the selector without this option. See selection/cost.py.
        config: chunking, memory format, autocast and compile (see EngineConfig).
        target: (B,) class to explain; default the predicted class.
        progress: called after every step with (pixels removed, HW).
        max_steps: for benchmarks — stop after this many steps; order is -1 and curve NaN beyond.
        on_passes: called with the forward passes made, per chunk of candidates (see PassesFunc).

    Returns:
        SelectionResult with order/curve (B, HW) on the images' device; forward_passes counts the
        images the model evaluated (`planned_forward_passes` gives it in advance).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    check_selector_args(pixels_per_step, exact_tail)
    device = images.device
    B, C, H, W = images.shape
    HW = H * W
    if not images.is_floating_point():
        raise ValueError("images must be normalised floats (see overinterp.data.normalize), got integers")
    scorer = Scorer(forward, config, images)  # after the input checks: it times forward passes
    order = torch.full((B, HW), -1, dtype=torch.long, device=device)
    curve = torch.full((B, HW), float("nan"), dtype=torch.float32, device=device)
    with torch.inference_mode():
        x = images.permute(0, 2, 3, 1).reshape(B, HW, C).clone()  # (B, HW, C) current masked images
        probs = scorer.probs(scorer.layout(images))
        target, confidence, pred = explained_class(probs, target)
        remaining = torch.arange(HW, device=device).expand(B, HW).clone()  # (B, R) ascending pixel ids
        plan = step_plan(HW, pixels_per_step, exact_tail)
        passes, sizes = run_steps(scorer, x, remaining, target, order, curve, 0, plan[:max_steps], (C, H, W), progress,
                                  on_passes)
    return SelectionResult(order, curve, pred, confidence, passes, sizes)


def run_steps(
    scorer: Scorer,
    x: torch.Tensor,
    remaining: torch.Tensor,
    target: torch.Tensor,
    order: torch.Tensor,
    curve: torch.Tensor,
    removed: int,
    plan: list[int],
    shape: tuple[int, int, int],
    progress: Optional[ProgressFunc] = None,
    on_passes: Optional[PassesFunc] = None,
) -> tuple[int, tuple[int, ...]]:
    """The BS loop from any state: remove plan[t] pixels at step t, writing order/curve in place.

    x: (B, HW, C) current masked images (updated in place); remaining: (B, R) pixel ids not yet
    masked, ascending, the same count R for every image; removed: HW - R, the position in
    order/curve the next step writes to. A step of 1 is exact BS; a step of k > 1 removes the k
    best-scoring pixels together and re-scores the new images for the curve.
    Returns (images evaluated, the step sizes taken). Call under torch.inference_mode().
    """
    B = x.shape[0]
    C, H, W = shape
    HW = H * W
    rows = torch.arange(B, device=x.device)[:, None]
    passes = 0
    for k in plan:
        R = HW - removed
        scores = _score_step(scorer, x, remaining, target, shape, on_passes)  # (B, R)
        passes += B * R
        if k == 1:
            best_score, pos = scores.max(1, keepdim=True)  # first max = lowest pixel id (ascending)
        else:
            # stable descending sort keeps equal scores in ascending pixel order; the step's k
            # pixels are then listed by position (= ascending pixel id), the canonical order
            pos = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].sort(1).values
        chosen = remaining.gather(1, pos)  # (B, k) pixel ids
        x[rows, chosen] = 0.0
        order[:, removed : removed + k] = chosen
        if k == 1:
            curve[:, removed : removed + 1] = best_score
        else:
            imgs = x.view(B, H, W, C).permute(0, 3, 1, 2)
            curve[:, removed : removed + k] = scorer.target_probs(imgs, target)[:, None]
            passes += B
            if on_passes is not None:
                on_passes(B)
        keep = torch.ones_like(remaining, dtype=torch.bool).scatter_(1, pos, False)
        remaining = remaining[keep].view(B, R - k)  # boolean gather preserves ascending order
        removed += k
        if progress is not None:
            progress(removed, HW)
    return passes, tuple(plan)


def brute_force_backward_selection(forward: ForwardFunc, image: torch.Tensor, masked: Sequence[int] = ()) -> tuple[list[int], list[float]]:
    """The reference twin: one image (C, H, W), one candidate per forward pass, plain Python.

    masked: pixel ids already removed (set to 0, never candidates) — the state an exact tail starts
    from; the class c is still the one predicted on the unmasked image.
    Returns the order and curve of the pixels not in `masked`.
    Exists for tests: every fast path must reproduce its order exactly.
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
