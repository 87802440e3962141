"""GPU readiness: every CUDA-only path of overinterp run on one GPU, each against the CPU where it can.

Checks, in order (each a row of the table: check, result, figure, seconds):
  bs_engine         exact backward selection on the GPU and on the CPU (default EngineConfig, so the
                    GPU side sizes its chunk from torch.cuda.mem_get_info and times it between syncs):
                    identical removal orders for every image
  autocast_bf16/fp16 the engine under bf16 / fp16 autocast against its fp32 run: a finite p(c) curve,
                    p(c) of the unmasked images within 0.05; the overlap of the last 5% of the orders
                    (the subset the paper keeps) is reported, not judged (the model is untrained)
  bgsis             Batched Gradient SIS with an exact tail, GPU against CPU with TF32 off on both sides:
                    identical orders; in the default precision (cuDNN convolutions in TF32, as a run's
                    gradient steps go) the identical count is reported, not judged: near-tied gradients
                    may order differently
  road_fill         ROAD's CG solve, GPU against CPU: max |difference| <= 1e-4 (normalised units);
                    the noise from a CUDA generator and from per-image seeds is reproducible
  chunk_sizing      max_chunk's budget (a quarter of mem_get_info's free memory on CUDA) holds the
                    chunk's activations, and the tuned chunk is within it
  train_step        one epoch of training.train_model (5% subsets, augmentation) on both: the mean
                    losses agree to 1%; a ROAD-filled epoch (CUDA noise generator) gives a finite loss
  eval_forward      the streamed EvalWorker's forward on the device against the CPU: the same
                    correct/incorrect flags (pipeline.stream needs Ray; without it the same calls)
  dataparallel      a pipeline.trial.run_trial on cuda with >= 2 GPUs (its DataParallel path)
  stream_trial_1gpu a streamed one-worker trial (run_stream_trial) in a Ray task holding one GPU, as a
                    Tune trial runs it: the training loop in that process, iter_torch_batches onto cuda
  ray_train_nccl    a streamed trial of two Ray Train workers: DDP over NCCL with device_ids
  explain_stage     the --explain stage's work (pipeline.explain_stage.answer_questions, no Ray) on the
                    device: a prior trained a few steps there, VCEs and disagreement images of untrained
                    models (their checkpoints written for it); finite objectives, every question
                    answered, the prior's samples back on the host (skipped without diffusers)
  device_rates      passes/s of each model of overinterp/device_rates.py on the device: the rows
                    are printed after the table, ready to paste into RATES

--cpu (chosen when CUDA is absent) runs the same checks with the CPU on both sides at tiny sizes
(autocast then runs fp32: the engine's autocast is CUDA only), to check this script's wiring in CI.
Exit status 1 when any check fails; a skipped check says why.
Usage: python benchmarks/gpu_check.py [--cpu] [--kind H100] [--checks bs_engine,...] [--json-out FILE]
"""

from __future__ import annotations

import importlib.util
import math
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch

from _common import describe, finish, machine, parser, start  # first: it puts this checkout on sys.path
from overinterp import device_rates
from overinterp.data import IMAGENET_MEAN, IMAGENET_STD
from overinterp.fill import fill, solve_road
from overinterp.models import create_model
from overinterp.selection import EngineConfig, backward_selection, batched_gradient_sis, keep_mask
from overinterp.selection.engine import Scorer, activation_bytes_per_image, exact_fp32, max_chunk
from overinterp.training import TrainConfig, prepare, train_model


@dataclass(frozen=True)
class Sizes:
    model: str  # a create_model name, 3 input channels, 10 classes
    size: int  # H = W of the selection images
    images: int  # images per selection check
    train_size: int  # H = W of the training images
    train_images: int
    road: tuple  # ((H = W, images), ...) of the ROAD fill check
    rate_models: tuple | None  # device_rates models to measure (None: all of the table)
    rate_seconds: float  # timed per model and pass


# GPU: the CPU side of exact BS at 12x12 is 4 x 10,440 passes of a ResNet20 (seconds on 16 cores)
GPU_SIZES = Sizes("resnet20", 12, 4, 32, 512, ((32, 64), (224, 4)), None, 2.0)
CPU_SIZES = Sizes("digits_cnn", 6, 2, 8, 64, ((16, 4),), ("digits_cnn",), 0.05)
CHECKS = ("bs_engine", "autocast_bf16", "autocast_fp16", "bgsis", "road_fill", "chunk_sizing", "train_step", "eval_forward",
          "dataparallel", "stream_trial_1gpu", "ray_train_nccl", "explain_stage", "device_rates")


class Skip(Exception):
    """A check that cannot run here; its message says why."""


def net(ctx, device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every device
    return create_model(ctx.sizes.model, 10, 3).eval().to(device)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) normalised images, on the CPU."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def same_orders(a, b) -> tuple[bool, str, dict]:
    """Two SelectionResults of the same images: identical orders, and how far their p(c) curves are."""
    same = (a.order.cpu() == b.order.cpu()).all(1)
    dp = float((a.curve.cpu() - b.curve.cpu()).abs().max())
    # the exact engine scores with TF32 off (engine.exact_fp32); a difference left is the GPU's own fp32 rounding
    return bool(same.all()), f"{int(same.sum())}/{len(same)} orders identical; max |dp(c)| {dp:.1e}", {"identical": same.tolist(), "max_dp": dp}


def bs_engine(ctx):
    x = images(ctx.sizes.images, ctx.sizes.size)
    return same_orders(backward_selection(net(ctx, ctx.ref), x), backward_selection(net(ctx, ctx.dev), x.to(ctx.dev)))


def autocast(mode):
    def check(ctx):
        if ctx.dev.type == "cuda" and mode == "bf16" and not torch.cuda.is_bf16_supported():
            raise Skip("this card has no bf16")
        x = images(ctx.sizes.images, ctx.sizes.size).to(ctx.dev)
        exact = backward_selection(net(ctx, ctx.dev), x)
        approx = backward_selection(net(ctx, ctx.dev), x, config=EngineConfig(autocast=mode if ctx.dev.type == "cuda" else None))
        ka, kb = keep_mask(exact.order, 0.05), keep_mask(approx.order, 0.05)  # (B, HW) the last 5% removed
        overlap = ((ka & kb).sum(1) / ka.sum(1)).mean().item()
        dconf = (exact.confidence - approx.confidence).abs().max().item()  # p(c) of the unmasked images
        ok = dconf <= 0.05 and bool(approx.curve.isfinite().all())  # fp16 overflows show as inf/NaN
        fp32 = "" if ctx.dev.type == "cuda" else " (--cpu: fp32)"
        return ok, f"5% tail overlap {overlap:.2f}; max |dp(c)| unmasked {dconf:.1e}{fp32}", {"overlap": overlap, "max_dp_unmasked": dconf}
    return check


def bgsis(ctx):
    x = images(ctx.sizes.images, ctx.sizes.size, seed=1)
    k = max(2, ctx.sizes.size ** 2 // 16)
    run = lambda dev: batched_gradient_sis(net(ctx, dev), x.to(dev), pixels_per_step=k, exact_tail=0.25)
    cpu = run(ctx.ref)
    with exact_fp32():
        strict_run = run(ctx.dev)
    ok, strict, data = same_orders(cpu, strict_run)
    _, default, data["default_precision"] = same_orders(cpu, run(ctx.dev))
    return ok, f"TF32 off: {strict}; default precision: {default}", data


def road_fill(ctx):
    worst, iters, repro = 0.0, [], True
    for size, n in ctx.sizes.road:
        x = images(n, size, seed=size)
        keep = torch.rand(n, size * size, generator=torch.Generator().manual_seed(size)) > 0.7  # 70% removed
        (a, ia), (b, ib) = solve_road(x, keep), solve_road(x.to(ctx.dev), keep.to(ctx.dev))
        worst, iters = max(worst, float((a - b.cpu()).abs().max())), iters + [ia, ib]
        xd, kd = x.to(ctx.dev), keep.to(ctx.dev)
        draw = lambda: fill(xd, kd, "road", std=IMAGENET_STD, generator=torch.Generator(device=ctx.dev).manual_seed(0))
        per_image = lambda: fill(xd, kd, "road", std=IMAGENET_STD, seeds=range(n))
        repro &= bool(torch.equal(draw(), draw()) and torch.equal(per_image(), per_image()))
    return worst <= 1e-4 and repro, f"max |diff| {worst:.1e} (<= 1e-4); CG iterations {iters}; noise reproducible: {repro}", {"max_abs_diff": worst}


def chunk_sizing(ctx):
    m, x = net(ctx, ctx.dev), images(2, ctx.sizes.size).to(ctx.dev)
    budget = torch.cuda.mem_get_info(ctx.dev)[0] // 4 if ctx.dev.type == "cuda" else 1 << 30  # bytes, as max_chunk takes it
    most, per_image = max_chunk(m, x), activation_bytes_per_image(m, x)
    tuned = Scorer(m, EngineConfig(), x).chunk
    ok = 1 <= tuned <= most and (most * per_image <= budget or most == 1)
    return ok, f"max {most} x {per_image / 2**10:.0f} KiB in {budget / 2**30:.1f} GiB; tuned {tuned}", {"max": most, "tuned": tuned, "budget": budget}


def train_data(ctx, n=None):
    n, s = n or ctx.sizes.train_images, ctx.sizes.train_size
    g = torch.Generator().manual_seed(2)
    imgs = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g)
    return imgs, torch.randint(0, 10, (n,), generator=g), torch.rand(n, s * s, generator=g) < 0.05  # 5% subsets


def train_step(ctx):
    imgs, labels, keep = train_data(ctx)
    cfg = TrainConfig(epochs=1, batch_size=64, augment=True)
    run = lambda dev, how: train_model(net(ctx, dev), imgs.to(dev), labels.to(dev), IMAGENET_MEAN, IMAGENET_STD, cfg, keep.to(dev), fill=how)[0]
    a, b, road = run(ctx.ref, "mean"), run(ctx.dev, "mean"), run(ctx.dev, "road")
    rel = abs(a - b) / abs(a)
    return rel <= 0.01 and math.isfinite(road), f"loss {a:.4f} / {b:.4f} (rel {rel:.1e}); road {road:.4f}", {"losses": [a, b], "road": road}


def eval_forward(ctx):
    imgs, labels, keep = train_data(ctx, 32)
    batch = {"image": imgs.numpy(), "label": labels.numpy(), "keep": np.packbits(keep.numpy(), axis=1)}
    if importlib.util.find_spec("ray"):
        from overinterp.pipeline.stream import EvalWorker  # imports Ray at its top

        def run(dev):
            worker = EvalWorker.__new__(EvalWorker)  # its __init__ asks Ray for the actor's GPU
            worker.device, worker.model, worker.hw = dev, net(ctx, dev), keep.shape[1]
            return worker(batch)
        how = "EvalWorker"
    else:
        def run(dev):  # EvalWorker.__call__'s calls, with the keep-mask unpacked by numpy
            m, x, y, k = net(ctx, dev), imgs.to(dev), labels.to(dev), keep.to(dev)
            with torch.inference_mode():
                return {"full": (m(prepare(x, IMAGENET_MEAN, IMAGENET_STD, None)).argmax(1) == y).cpu().numpy(),
                        "own": (m(prepare(x, IMAGENET_MEAN, IMAGENET_STD, k)).argmax(1) == y).cpu().numpy()}
        how = "its forward, no Ray"
    a, b = run(ctx.ref), run(ctx.dev)
    agree = int((a["full"] == b["full"]).sum() + (a["own"] == b["own"]).sum())
    return agree == 2 * len(labels), f"{agree}/{2 * len(labels)} flags agree ({how})", {"agree": agree}


def dataparallel(ctx):
    if ctx.dev.type != "cuda" or torch.cuda.device_count() < 2:
        raise Skip(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
    from overinterp.pipeline.trial import TrialSpec, run_trial

    imgs, labels, _ = train_data(ctx)
    data = {"images": {"train": imgs.numpy(), "test": imgs.numpy()}, "labels": {"train": labels.numpy(), "test": labels.numpy()},
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": 10}
    with tempfile.TemporaryDirectory() as out:
        r = run_trial(TrialSpec(ctx.sizes.model, 0), data, {}, TrainConfig(epochs=1, batch_size=64), out, device=ctx.dev)
    return math.isfinite(r["train_loss"]), f"{torch.cuda.device_count()} GPUs; loss {r['train_loss']:.4f}", {"train_loss": r["train_loss"]}


def ray_train(workers):
    def check(ctx):
        if not importlib.util.find_spec("ray"):
            raise Skip("needs Ray (not installed)")
        if ctx.dev.type != "cuda" or torch.cuda.device_count() < workers:
            raise Skip(f"needs {workers} CUDA GPU(s), found {torch.cuda.device_count()}")
        import ray

        from overinterp.pipeline.images import MASK_COLUMN
        from overinterp.pipeline.train_stream import run_stream_trial
        from overinterp.pipeline.trial import TrialSpec

        imgs, labels, keep = train_data(ctx)
        packed = np.packbits(keep.numpy(), axis=1)
        rows = [{"image_id": i, "label": int(labels[i]), "image": imgs[i].numpy(), MASK_COLUMN: packed[i]} for i in range(len(labels))]
        info = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "hw": keep.shape[1], "num_classes": 10}
        res = SimpleNamespace(cpus_per_trial=1, use_gpu=True, gpus_per_trial=1)
        ray.init(ignore_reinit_error=True, include_dashboard=False)
        with tempfile.TemporaryDirectory() as out:
            streams = {"train": ray.data.from_items(rows), "val": ray.data.from_items(rows)}
            args = (TrialSpec(ctx.sizes.model, 0, "m/sel"), streams, asdict(TrainConfig(epochs=1, batch_size=64)), info, out, res)
            if workers == 1:  # it trains where it is called: in a process given the GPU, as a Tune trial is
                r = ray.get(ray.remote(num_gpus=1)(run_stream_trial).remote(*args, use_cuda=True, workers=1, max_failures=0))
            else:
                r = run_stream_trial(*args, use_cuda=True, workers=workers, max_failures=0)
        return r["device"] == "cuda" and math.isfinite(r["train_loss"]), f"{workers} worker(s); loss {r['train_loss']:.4f}", {"train_loss": r["train_loss"]}
    return check


def explain_stage(ctx):
    if importlib.util.find_spec("diffusers") is None:
        raise Skip("diffusers is not installed (the explain extra)")
    from unittest import mock

    from overinterp.config import RunConfig
    from overinterp.models import ModelSpec, build, save_checkpoint
    from overinterp.pipeline.analysis import TestImages
    from overinterp.pipeline.explain_stage import ExplainSettings, answer_questions, explain_models
    from overinterp.pipeline.plan import make_plan

    g = torch.Generator().manual_seed(3)
    train = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g).numpy()
    test = TestImages(np.arange(8), train[:8], np.arange(8) % 10, (0.5,), (0.25,), tuple(map(str, range(10))), 8)
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(out_dir=out, seeds=(0, 1)).resolved()
        plan = make_plan(cfg, (1, 8, 8), {"train": 64, "test": 8}, 10)
        models = explain_models(plan)
        for ref in {r.source.tag: r for r in models.refs()}.values():
            torch.manual_seed(0)
            save_checkpoint(ref.source.checkpoints[0], ModelSpec("digits_cnn", 10, 1), build(ModelSpec("digits_cnn", 10, 1)))
        settings = ExplainSettings(("vce", "disagree"), "noise", images=2, prior_steps=3, generator=None, guidance_steps=2, iterations=2)
        with mock.patch("overinterp.pipeline.explain_stage.pick_device", return_value=ctx.dev):
            res = answer_questions(settings, out, models, test, train, 10)
    section = res["section"]
    finite = all(math.isfinite(v["mean_l2"]) or v["success_rate"] == 0 for v in section["vce"].values())
    answered = len(section["vce"]) == 2 and len(section["disagree"]) == len(models.pairs)
    ok = finite and answered and isinstance(res["prior"]["samples"], np.ndarray)
    return ok, f"{sum(v['n'] for v in section['vce'].values())} VCEs, {len(section['disagree'])} pairs on {ctx.dev}", {"answered": answered}


def rates(ctx):
    rows = device_rates.measured_rows(ctx.dev.type, ctx.kind, seconds=ctx.sizes.rate_seconds, models=ctx.sizes.rate_models)
    ctx.rate_lines = [line for _, line in rows]
    ok = all(r.forward > 0 and r.train > 0 for r, _ in rows)
    return ok, "; ".join(f"{r.model} {r.forward:,.0f}/{r.train:,.0f} img/s" for r, _ in rows), {"rows": [asdict(r) for r, _ in rows]}


RUNNERS = dict(zip(CHECKS, (bs_engine, autocast("bf16"), autocast("fp16"), bgsis, road_fill, chunk_sizing, train_step, eval_forward,
                            dataparallel, ray_train(1), ray_train(2), explain_stage, rates)))


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--cpu", action="store_true", help="the CPU on both sides, tiny sizes: checks this script's wiring")
    p.add_argument("--kind", help="the device_rates rows' device as Ray names the GPU kind, e.g. H100 (default: GPU)")
    p.add_argument("--checks", default=",".join(CHECKS), help="comma-separated checks to run, in the table's order (default: all)")
    args = p.parse_args(argv)
    chosen = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CHECKS))
    if unknown or not chosen:
        p.error(f"--checks: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CHECKS)}")
    cpu = args.cpu or not torch.cuda.is_available()
    dev = torch.device("cpu") if cpu else torch.device("cuda", 0)
    ctx = SimpleNamespace(dev=dev, ref=torch.device("cpu"), sizes=CPU_SIZES if cpu else GPU_SIZES, kind=args.kind, rate_lines=[])
    started = start()
    print(f"\nGPU check on {dev}{' (--cpu: the wiring check)' if cpu else ''}; {describe(machine(dev))}")
    print(f"{'check':<18}{'result':<10}{'seconds':>8}  figure", flush=True)
    rows = []
    for name in (c for c in CHECKS if c in chosen):
        t0 = time.perf_counter()
        try:
            ok, figure, data = RUNNERS[name](ctx)
            result = "pass" if ok else "FAIL"
        except Skip as e:
            result, figure, data = f"skipped ({e})", "", {}
        except Exception as e:  # noqa: BLE001 - a check that raises is a failed row, and the rest still run
            result, figure, data = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", {"traceback": traceback.format_exc()}
        r = {"check": name, "result": result, "figure": figure, "seconds": time.perf_counter() - t0, **data}
        rows.append(r)  # each row printed as it ends: a long check on a slow card shows progress
        print(f"{r['check']:<18}{r['result'] if r['result'] in ('pass', 'FAIL') else 'skipped':<10}{r['seconds']:>8.1f}  "
              f"{r['figure'] or r['result'][len('skipped ('):-1]}", flush=True)
    report = {"machine": machine(dev), "device": str(dev), "cpu_mode": cpu, "checks": rows, "rate_lines": ctx.rate_lines}
    print("\ndevice_rates.py rows (paste into RATES):\n" + "\n".join(ctx.rate_lines))
    finish(report, started, args.json_out)
    return report


if __name__ == "__main__":
    sys.exit(1 if any(r["result"] == "FAIL" for r in main()["checks"]) else 0)
