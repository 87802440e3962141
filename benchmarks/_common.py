"""What every benchmark script shares: timing on a device, the machine and versions a number was
measured on, and the report's tail (how long it took under what load, the BENCH_JSON line, --json-out).

Importing this module puts the repository root on sys.path, so `python benchmarks/<script>.py`
imports this checkout's overinterp without installing it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from typing import Callable, Iterator, TypeVar

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

T = TypeVar("T")


def parser(doc: str) -> argparse.ArgumentParser:
    """A script's argument parser: its docstring as the help text, and --json-out (see finish)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json-out", default=None, help="also write the BENCH_JSON line to this file")
    return p


def sync(device: torch.device) -> None:
    """Wait for the device: GPU work is asynchronous, so a timer stops only after this."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """(fn(), wall seconds), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with n torch CPU threads (None: torch's default), then restore the caller's setting (a test session's)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine(device: torch.device | None = None, packages: tuple[str, ...] = ()) -> dict:
    """The machine and versions a result was measured on.

    Args:
        device: adds the GPU's name when it is a CUDA device.
        packages: distributions whose installed version to record beside torch's (None if absent).
    Returns:
        cpu (model name), cpu_count, ram_gib, threads (torch's CPU threads), python, platform,
        torch, one key per package, and gpu on CUDA.
    """
    cpu, ram_kib = platform.processor() or "unknown", 0
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            ram_kib = next((int(line.split()[1]) for line in f if line.startswith("MemTotal:")), 0)
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "ram_gib": round(ram_kib / 2**20, 1), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__}
    for pkg in packages:
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(m: dict) -> str:
    """One line for the head of a human table: 'AMD EPYC, 2 CPUs, 24 GiB, 2 torch threads; Python 3.11.7, torch 2.5.1, ...'."""
    versions = ", ".join(f"{k} {m[k]}" for k in m if k not in ("cpu", "cpu_count", "ram_gib", "threads", "python", "platform", "gpu"))
    gpu = f"; {m['gpu']}" if "gpu" in m else ""
    return f"{m['cpu']}, {m['cpu_count']} CPUs, {m['ram_gib']} GiB, {m['threads']} torch threads{gpu}; Python {m['python']}, {versions}"


def start() -> tuple[float, float]:
    """(wall clock, 1-min load average) at the start of a benchmark: other tenants share these cores."""
    return time.time(), os.getloadavg()[0]


def finish(report: dict, started: tuple[float, float], json_out: str | None) -> dict:
    """The report's tail: adds seconds and the load average before and after, prints them and the
    BENCH_JSON line (the whole report as one JSON line), and writes that line to json_out if given."""
    t0, load_before = started
    report.update(seconds=time.time() - t0, load_avg_before=load_before, load_avg_after=os.getloadavg()[0])
    print(f"(benchmark took {report['seconds']:.0f} s; 1-min load average {load_before:.1f} before, {report['load_avg_after']:.1f} after)")
    line = json.dumps(report)
    print("BENCH_JSON " + line)
    if json_out:
        with open(json_out, "w") as f:
            f.write(line + "\n")
    return report
