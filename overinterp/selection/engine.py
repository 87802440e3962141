"""What every selection engine shares: the result type, the engine settings, the scorer and its
chunk sizing.

- SelectionResult: removal order and p(c) curve of B images, with the pass counters;
- EngineConfig: how candidates are batched (chunk, memory budget, memory format, autocast,
  compile); none of it changes the exact fp32 result;
- Scorer: p(c | candidate) for stacks of masked images, with the model prepared once
  (channels_last, a chunk size tuned on the device, optionally torch.compile), and
  `score_candidates`, which builds and scores a step's candidates chunk by chunk on the device;
- chunk sizing: `max_chunk` (what fits the memory budget), `tune_chunk` (the fastest batch size
  below it, measured with `forward_rate` between device syncs);
- the callback types (ForwardFunc, PassesFunc), `widen` (logits in fp32 or wider),
  `explained_class` (the class c each image is explained for), `check_images` and `ranks`.

Backward selection (backselect.py), Batched Gradient SIS (gradient.py) and the ranking selectors
(ranking.py, attribution.py, perturbation.py) build on this module; it imports none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn


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


def check_images(images: torch.Tensor) -> None:
    """Raise a one-line ValueError unless images are normalised floats (B, C, H, W)."""
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be normalised floats (B, C, H, W) (see overinterp.data.normalize), "
                         f"got shape {tuple(images.shape)} {images.dtype}")


def ranks(order: torch.Tensor) -> torch.Tensor:
    """(B, HW) order -> (B, HW) rank: rank[b, j] = position of pixel j in order[b] (0 = removed first)."""
    B, HW = order.shape
    return torch.empty_like(order).scatter_(1, order, torch.arange(HW, device=order.device).expand(B, HW))


# The arguments every selector takes (backselect.py, gradient.py, attribution.py, perturbation.py):
#   forward: a ForwardFunc, the model in eval mode on the images' device (put it there first);
#   images: (B, C, H, W) normalised floats (a masked pixel is 0 on all channels: the mean colour);
#   target: (B,) the class to explain; None explains the prediction on the unmasked image;
#   on_passes: a PassesFunc told of the forward passes as they are made.
ForwardFunc = Callable[[torch.Tensor], torch.Tensor]  # (N, C, H, W) normalised -> (N, K) logits
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
    # images the model evaluated for the selection, all B images together (what counts, and the
    # count in advance: selection/cost.py)
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


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA): timings must not stop at a kernel launch."""
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
            sync(sample.device)
            t0 = time.perf_counter()
            forward(x)
            sync(sample.device)
            best = max(best, batch / (time.perf_counter() - t0))
    return best


_TUNED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # forward -> {setting: chunk}


def tune_chunk(forward: ForwardFunc, sample: torch.Tensor, limit: int, channels_last: bool) -> int:
    """The fastest batch size among powers of two up to `limit` (CPU caches favour ~128 for a
    ResNet20; GPUs favour the largest). A larger size must be 3% faster to be preferred.

    Measured once per (forward, image shape, dtype, device, sizes tried, memory format) and cached:
    the sizes tried are the powers of two up to `limit`, so the key holds the largest of them; on
    CUDA the limit follows the free memory, which moves between calls as the allocator caches blocks.
    """
    tried_up_to = limit if limit < 8 else 1 << (limit.bit_length() - 1)
    key = (tuple(sample.shape[1:]), sample.dtype, str(sample.device), tried_up_to, channels_last, torch.is_autocast_enabled())
    try:
        cache = _TUNED.setdefault(forward, {})
    except TypeError:  # not weak-referenceable: measure every time
        cache = {}
    if key not in cache:
        cache[key] = _measure_best_chunk(forward, sample, limit, channels_last, stop_early=sample.device.type != "cuda")
    return cache[key]


def _measure_best_chunk(forward: ForwardFunc, sample: torch.Tensor, limit: int, channels_last: bool, stop_early: bool) -> int:
    """stop_early: stop after two doublings without a gain. A CPU's rate rises smoothly to one peak
    and each size costs seconds there; a GPU's has plateaus (cuDNN picks another algorithm as the
    batch grows: an H100 ran ResNet20 at 32 px, channels_last, at 61k images/s at 256, 66k at 1,024
    and 145k at 4,096), so there every size up to the limit is measured (milliseconds each)."""
    best, best_rate, size = 1, 0.0, 8
    while size <= limit:
        rate = forward_rate(forward, sample, size, channels_last)
        if rate > 1.03 * best_rate:
            best, best_rate = size, rate
        elif stop_early and size >= 4 * best:  # two doublings without a gain: past the peak
            break
        size *= 2
    return best if best_rate else limit  # limit < 8: nothing measured, take the largest that fits


@contextlib.contextmanager
def exact_fp32():
    """CUDA's TF32 off while the block runs, restored after: cuDNN convolutions default to TF32 on
    Ampere and newer GPUs (a 10-bit mantissa), which can reorder near-tied candidates and would make
    a GPU's removal order differ from the CPU's."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


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
            # no step scores more candidates than the first: every pixel of every image (B·HW)
            most = min(max_chunk(forward, sample, config.memory_bytes), sample.shape[0] * sample.shape[2] * sample.shape[3])
            with self._autocast():
                self.chunk = tune_chunk(forward, sample, most, config.channels_last)
        self.forward = compiled(forward) if config.compile else forward

    def _autocast(self):
        if self.config.autocast is None:
            return exact_fp32() if self.device.type == "cuda" else contextlib.nullcontext()
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


def score_candidates(scorer: Scorer, n: int, per_image: int, shape: tuple[int, int, int], target: torch.Tensor,
                     build: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dtype: torch.dtype,
                     on_passes: Optional[PassesFunc] = None) -> torch.Tensor:
    """(n,) p(target) of n candidate images, built and scored chunk by chunk on the device.

    Candidate i belongs to image b = i // per_image; build(idx, b) returns the (M, HW, C) candidates
    idx (NHWC memory) of images b. target: (B,) on the device. Call under torch.inference_mode().
    """
    C, H, W = shape
    scores = torch.empty(n, device=target.device, dtype=dtype)
    # balanced chunks: 1,030 candidates at chunk 512 run as 3 x 344, not 512 + 512 + 6; compiled
    # models keep one static size instead (Scorer.probs pads the last chunk)
    size = scorer.chunk if scorer.config.compile else math.ceil(n / math.ceil(n / scorer.chunk))
    for start in range(0, n, size):
        idx = torch.arange(start, min(start + size, n), device=target.device)
        b = torch.div(idx, per_image, rounding_mode="floor")
        imgs = build(idx, b).view(-1, H, W, C).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
        if not scorer.config.channels_last:
            imgs = imgs.contiguous()
        scores[start : start + len(idx)] = scorer.target_probs(imgs, target[b])
        if on_passes is not None:  # per chunk: one step of a 224-px image is minutes of CPU
            on_passes(len(idx))
    return scores


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled(forward: ForwardFunc) -> ForwardFunc:
    """torch.compile(forward) once per model object (compiling costs ~30 s on a CPU)."""
    if forward not in _COMPILED:
        _COMPILED[forward] = torch.compile(forward, dynamic=False)
    return _COMPILED[forward]
