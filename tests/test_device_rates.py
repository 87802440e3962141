"""device_rates: the table of measured device rates, and driver CPU rates scaled by it."""

import pytest
import torch

from overinterp import device_rates
from overinterp.device_rates import DEFAULT_MODEL, RATES, DeviceRate, measure, scaled


def _row(model, device):
    (row,) = [r for r in RATES if r.model == model and r.device == device]
    return row


def test_every_row_can_be_used():
    """Each model has one CPU row, and its other devices' rows at the same shape; every rate > 0;
    a GPU row names its card; the generic "GPU" rows say which card's they are."""
    for r in RATES:
        cpu = _row(r.model, "cpu")
        assert r.shape == cpu.shape and r.forward > 0 and r.train > 0, r
        assert r.device == "cpu" or r.device in r.measured_on, r
        if r.device == "GPU":
            h100 = _row(r.model, "H100")
            assert (r.forward, r.train) == (h100.forward, h100.train) and "the H100's rows" in r.measured_on
    assert _row(DEFAULT_MODEL, "GPU")


def test_driver_rates_scale_by_the_ratio_of_the_models_rows():
    cpu, gpu = _row("resnet20", "cpu"), _row("resnet20", "GPU")
    fwd, train, how = scaled("resnet20", "", 10.0, 2.0)  # "": Ray named no GPU kind
    assert fwd == pytest.approx(10.0 * gpu.forward / cpu.forward) and train == pytest.approx(2.0 * gpu.train / cpu.train)
    assert "resnet20's GPU and CPU rows" in how and "the H100's rows" in how.split("(")[-1]
    assert how.endswith("; Ray names no GPU kind: the generic GPU rows")  # the fallback is said, not silent
    # a model without rows is scaled as the default model; a GPU kind with rows of its own uses them
    _, _, how = scaled("tv:vit_b_16", "A10G", 1.0, 1.0)
    assert f"{DEFAULT_MODEL}'s GPU and CPU rows" in how and how.endswith("Ray names the GPU kind A10G, which has no rows: the generic GPU rows")
    _, _, how = scaled("tv:vit_b_16", "H100", 1.0, 1.0)
    assert f"{DEFAULT_MODEL}'s H100 and CPU rows" in how and "generic" not in how


def test_a_gpu_kind_with_rows_uses_them(monkeypatch):
    cpu = _row("resnet20", "cpu")
    a10g = DeviceRate("resnet20", "A10G", cpu.shape, cpu.forward * 100, cpu.train * 50, "A10G 24GB, torch 2.14.1")
    monkeypatch.setattr(device_rates, "RATES", RATES + (a10g,))
    fwd, train, how = scaled("resnet20", "A10G", 3.0, 1.0)
    assert (fwd, train) == pytest.approx((300.0, 50.0)) and "resnet20's A10G and CPU rows" in how and "(A10G 24GB" in how


def test_measure_times_both_passes_and_restores_the_threads(monkeypatch):
    timed = []  # (pass, threads while it was timed, its batch)

    def timer(name: str, rate: float):
        return lambda *args, **kwargs: timed.append((name, torch.get_num_threads(), args[-1])) or rate

    monkeypatch.setattr(device_rates, "calibrate_forward_rate", timer("forward", 900.0))
    monkeypatch.setattr(device_rates, "calibrate_train_rate", timer("train", 300.0))
    threads = torch.get_num_threads()
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    assert measure(net, (1, 8, 8), 3, threads=1, train_batch=2) == (900.0, 300.0)  # each pass its own rate
    batch = device_rates.calibration_batch(64)
    assert timed == [("forward", 1, batch), ("train", 1, min(2, batch))]  # at one thread, training at most train_batch
    assert torch.get_num_threads() == threads  # restored
    monkeypatch.undo()
    fwd, train = measure(net, (1, 8, 8), 3, threads=1, seconds=0.02)  # and the real timing runs
    assert fwd > 0 and train > 0
