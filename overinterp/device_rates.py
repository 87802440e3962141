"""Measured images/s of models on each kind of device, each with the device it came from.

A plan never runs a task on the selection device: a dry run or a refused plan must not make an
autoscaler start a GPU node. So the plan calibrates the run's models on the driver's CPU at the
run's image size (`measure`, tiny: a few seconds even at 224 px) and scales those rates to the
workers' device by this table's ratio for the same model: device rate ÷ reference CPU rate, both
measured as the driver measures (REFERENCE_THREADS threads, `calibration_batch` images; a GPU at
GPU_MIN_BATCH images or more, the batches its workers run). A model
without rows is scaled as DEFAULT_MODEL; a GPU kind without rows as "GPU" (any card).

Rows are measured with `python -m overinterp.device_rates --device cpu|cuda [--kind H100]` (it
prints them; `benchmarks/gpu_check.py` prints a GPU's rows too). The "GPU" rows, for a GPU kind
without rows of its own, are the H100's: their `measured_on` says so.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass, replace

import torch

from overinterp.costplan import calibrate_forward_rate, calibrate_train_rate

# Torch threads of the "cpu" rows and of the driver's calibration for a GPU run: one thread is what
# any driver has, and on a shared machine the steadiest measure (two threads on two busy cores ran
# 10-30× slower than one, their OpenMP workers waiting on each other).
REFERENCE_THREADS = 1
CALIBRATION_SECONDS = 0.5  # per model and kind of pass: a plan's calibration stays within seconds
# Images per timed pass on a GPU, at least: a GPU worker selects select_batch (64) images at a time
# and trains at batch 128, and at calibration_batch's 2 images of 224 px a GPU times its launch
# latency, not its throughput (an H100 ran tv:resnet18 at 1,826 images/s at 2 per pass).
GPU_MIN_BATCH = 64


@dataclass(frozen=True)
class DeviceRate:
    model: str  # a model name as create_model takes it
    device: str  # "cpu" (REFERENCE_THREADS threads), a GPU kind as Ray names it ("H100"), or "GPU"
    shape: tuple[int, int, int]  # (C, H, W) it was measured at
    forward: float  # images/s of inference, fp32 (channels_last on GPUs), as selection runs it
    train: float  # images/s of SGD training steps
    measured_on: str  # machine and versions it was measured on


_CPU = "AMD EPYC, 1 thread, torch 2.14.1 CPU; best of 3 runs on a shared 2-core machine (load average 6-11), 2026-12-05"
_H100 = "NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, benchmarks/gpu_check.py, 2026-12-05"
_H100_ROWS = (
    DeviceRate("digits_cnn", "H100", (1, 8, 8), 2_022_642, 138_425, _H100),
    DeviceRate("resnet20", "H100", (3, 32, 32), 67_273, 12_468, _H100),
    DeviceRate("tv:resnet18", "H100", (3, 224, 224), 22_459, 4_326, _H100),
    DeviceRate("tv:resnet50", "H100", (3, 224, 224), 6_806, 1_713, _H100),
)
# a GPU kind without rows of its own ("GPU") is scaled as the one card measured, and the plan says so
RATES = (
    DeviceRate("digits_cnn", "cpu", (1, 8, 8), 76_125, 44_388, _CPU),
    DeviceRate("resnet20", "cpu", (3, 32, 32), 942, 210, _CPU),
    DeviceRate("tv:resnet18", "cpu", (3, 224, 224), 25, 4, _CPU),
    DeviceRate("tv:resnet50", "cpu", (3, 224, 224), 5.02, 1.51, _CPU),
    *_H100_ROWS,
    *(replace(r, device="GPU", measured_on=f"the H100's rows, for any GPU kind without its own: {r.measured_on}") for r in _H100_ROWS),
)
DEFAULT_MODEL = "tv:resnet50"  # what a model without rows is scaled as: the ImageNet models are its size


def calibration_batch(hw: int) -> int:
    """Images per timed pass: about what the engine's chunks hold (many small images, few large)."""
    return max(2, min(256, 65536 // hw))


def measure(model: torch.nn.Module, shape, num_classes: int, device: str = "cpu", threads: int = REFERENCE_THREADS,
            train_batch: int = 128, seconds: float = CALIBRATION_SECONDS) -> tuple[float, float]:
    """(forward, training) images/s of `model` on `device`, at `calibration_batch` images, at least
    GPU_MIN_BATCH on a GPU (training: at most `train_batch`), with `threads` torch threads (restored after)."""
    dev, batch, before = torch.device(device), calibration_batch(shape[1] * shape[2]), torch.get_num_threads()
    if dev.type != "cpu":
        batch = max(batch, GPU_MIN_BATCH)
    torch.set_num_threads(max(1, threads))
    try:
        fwd = calibrate_forward_rate(model, shape, dev, batch, seconds=seconds, channels_last=dev.type == "cuda")
        return fwd, calibrate_train_rate(model, shape, num_classes, dev, min(train_batch, batch), seconds=seconds)
    finally:
        torch.set_num_threads(before)


def _row(model: str, device: str):
    return next((r for r in RATES if r.model == model and r.device == device), None)


def scaled(model: str, kind: str, forward: float, train: float) -> tuple[float, float, str]:
    """The driver's CPU rates of `model` (as `measure` takes them) scaled to a GPU of `kind` ("H100";
    "" unknown) by the table's ratio: (forward, train, where they came from, in words)."""
    device = kind if any(r.device == kind for r in RATES) else "GPU"
    ref = model if _row(model, "cpu") and _row(model, device) else DEFAULT_MODEL
    cpu, gpu = _row(ref, "cpu"), _row(ref, device)
    f, t = gpu.forward / cpu.forward, gpu.train / cpu.train
    fallback = "" if device == kind else f"; Ray names {f'the GPU kind {kind}, which has no rows' if kind else 'no GPU kind'}: the generic GPU rows"
    return forward * f, train * t, (f"the driver's CPU × {f:,.0f} (training × {t:,.0f}), the ratio of {ref}'s {device} and CPU rows in "
                                    f"overinterp/device_rates.py ({gpu.measured_on.split(';')[0]}){fallback}")


def _num(x: float) -> str:
    return f"{x:_.0f}" if x >= 100 else f"{x:.3g}"


def measured_rows(device: str = "cpu", kind: str | None = None, threads: int = REFERENCE_THREADS, seconds: float = 2.0,
                  models=None) -> list[tuple[DeviceRate, str]]:
    """Measure the table's models (or `models`, names from it) on one device: each as a DeviceRate and as
    the line to paste into RATES. kind: the rows' device as Ray names its GPU kind (default: cpu, or GPU)."""
    from overinterp.models import create_model

    kind = kind or ("cpu" if device == "cpu" else "GPU")
    card = (platform.processor() or platform.machine()) if device == "cpu" else torch.cuda.get_device_name()
    where = f"{card}, {threads} thread(s), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    out = []
    for model in models or dict.fromkeys(r.model for r in RATES):
        shape = _row(model, "cpu").shape
        classes = 10 if shape[1] < 64 else 1000  # the data sets these models are for
        fwd, train = measure(create_model(model, classes, shape[0]), shape, classes, device, threads, seconds=seconds)
        out.append((DeviceRate(model, kind, shape, fwd, train, where),
                    f'    DeviceRate("{model}", "{kind}", {shape}, {_num(fwd)}, {_num(train)}, "{where}"),'))
    return out


def main(argv=None) -> None:
    """Measure the table's models on one device and print their rows."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--kind", help="the rows' device as Ray names its GPU kind, e.g. H100 (default: cpu, or GPU on cuda)")
    p.add_argument("--threads", type=int, default=REFERENCE_THREADS)
    args = p.parse_args(argv)
    for _, line in measured_rows(args.device, args.kind, args.threads):
        print(line)

if __name__ == "__main__":
    main()
