"""Batched Gradient SIS with a pretrained torchvision model on ImageNet-style data, on a Ray cluster.

Images stream from --train/--val (an ImageFolder split, <path>/<class>/<image>, or Parquet of encoded
images with columns image and label; local paths or s3://) through Ray Data to GPU actors that
run BGSIS and write Parquet to --out. Then models are trained from scratch on the 10% subsets (and
on random 10% subsets) as Ray Tune trials that each run a Ray Train DDP trainer (--workers-per-trial), and compared with the
pretrained model's accuracy in MLflow.

    ray job submit --working-dir . -- python jobs/sis_imagenet.py \\
        --train s3://BUCKET/imagenet/train --val s3://BUCKET/imagenet/val \\
        --model tv:inception_v3 --weights DEFAULT --image-size 299 --pixels-per-step 100 \\
        --out s3://BUCKET/overinterp/imagenet --tracking-uri http://127.0.0.1:5000

Rerunning with the same --out resumes: images already in the store and finished trials are skipped.
--smoke-test runs it in a few minutes on 2 CPUs on a tiny synthetic data set written as JPEG/PNG folders
(or, with --smoke-format parquet, as Parquet of encoded images) and tv:resnet18 weights written to
a local file. Before any work it prints the plan: stages, resources, BGSIS passes and training
images with ETAs from a short calibration; --dry-run stops there, and a plan over --max-hours
(default 24) stops there with faster settings that fit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overinterp.cli import add_resource_arguments, one_line_errors  # noqa: E402
from overinterp.config import ConfigError, ImageNetConfig  # noqa: E402


def _csv_ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    d = ImageNetConfig(train="", val="")
    p = argparse.ArgumentParser(prog="sis_imagenet.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", help="train images: ImageFolder split or Parquet of encoded images (path or s3://)")
    p.add_argument("--val", help="validation images, same layout as --train")
    p.add_argument("--model", default=d.model, help="torchvision model explained by BGSIS, as tv:<name>")
    p.add_argument("--weights", default=d.weights, help="torchvision weights name (DEFAULT, ResNet50_Weights.IMAGENET1K_V2) or a local state_dict file")
    p.add_argument("--num-classes", type=int, default=d.num_classes, help="classes (default: the folder's, or 1000 for Parquet)")
    p.add_argument("--train-model", default=None, help="architecture trained on the subsets (default: --model)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="square crop side: 224, or 299 for Inception v3")
    p.add_argument("--pixels-per-step", type=int, default=d.pixels_per_step, help="BGSIS k: pixels masked per step")
    p.add_argument("--exact-tail", type=float, default=d.exact_tail, help="F in (0, 1]: BGSIS until F·HW pixels remain, then exact backward selection (1: off)")
    p.add_argument("--fraction", type=float, default=d.fraction, help="pixel-subset size, in (0, 1]")
    p.add_argument("--seeds", type=_csv_ints, default=d.seeds, help="comma-separated training seeds")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d.augment, help="random crop + flip while training")
    p.add_argument("--workers-per-trial", type=int, default=d.workers_per_trial, help="Ray Train workers (DDP) per trial, each with --gpus-per-trial GPUs")
    p.add_argument("--strict", action="store_true", help="stop at the first image that does not decode (default: skip it and list it in summary.json)")
    p.add_argument("--select-batch", type=int, default=d.select_batch, help="images per BGSIS batch and Parquet shard")
    p.add_argument("--max-images", type=int, default=d.max_images, help="per split: a pilot on the first N images")
    p.add_argument("--out", dest="out_dir", default=d.out_dir, help="output directory or URI (s3://...); rerun with the same one to resume")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite in --out)")
    p.add_argument("--experiment", default=d.experiment, help="MLflow experiment name")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--max-hours", type=float, default=d.max_hours,
                   help="refuse to start when the planned ETA is longer (0: no limit); the error names faster settings")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, resources, forward passes, ETA) and exit, writing nothing")
    add_resource_arguments(p)
    p.add_argument("--smoke-test", action="store_true", help="tiny synthetic data, tv:resnet18 from a local weights file: a wiring check, minutes on 2 CPUs")
    p.add_argument("--smoke-format", choices=("folder", "parquet"), default="folder", help="--smoke-test data layout")
    return p


def _smoke_inputs(fmt: str) -> dict:
    import torch

    from overinterp.models import create_model
    from overinterp.synthetic import write_encoded_parquet, write_imagefolder

    scratch = tempfile.mkdtemp(prefix="sis_imagenet-smoke-")
    if fmt == "folder":
        write_imagefolder(scratch, n_per_class=4, num_classes=3, size=40)
        train, val = os.path.join(scratch, "train"), os.path.join(scratch, "val")
    else:
        train, val = os.path.join(scratch, "train.parquet"), os.path.join(scratch, "val.parquet")
        write_encoded_parquet(train, n=12, num_classes=3, size=40, seed=0)
        write_encoded_parquet(val, n=12, num_classes=3, size=40, seed=1)
    weights = os.path.join(scratch, "resnet18-3class.pt")
    torch.manual_seed(0)
    torch.save(create_model("tv:resnet18", num_classes=3).state_dict(), weights)
    return dict(train=train, val=val, model="tv:resnet18", weights=weights, num_classes=3, image_size=32,
                pixels_per_step=64, epochs=1, batch_size=8, select_batch=6, smoke=True, out_dir=os.path.join(scratch, "out"))


def config_fields(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """ImageNetConfig's fields from the parsed flags; with --smoke-test, the smoke inputs are the
    defaults and any flag the user gave (--epochs 4, --out DIR) wins."""
    fields = {k: v for k, v in vars(args).items() if k in ImageNetConfig.__dataclass_fields__}
    if args.smoke_test:
        smoke = _smoke_inputs(args.smoke_format)
        fields.update({k: v for k, v in smoke.items() if k not in fields or fields[k] == parser.get_default(k)})
    return fields


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fields = config_fields(parser, args)
    if not args.smoke_test and not (args.train and args.val):
        parser.print_usage(sys.stderr)
        print("sis_imagenet.py: error: --train and --val are required (or --smoke-test)", file=sys.stderr)
        return 2
    try:
        config = ImageNetConfig(**fields)
    except ConfigError as e:
        print(f"sis_imagenet.py: error: {e}", file=sys.stderr)
        return 2

    def run():
        config.check()
        from overinterp.pipeline.imagenet import run_imagenet  # Ray/MLflow once input is valid

        return run_imagenet(config, args.ray_address or os.environ.get("RAY_ADDRESS"), dry_run=args.dry_run)

    status, summary = one_line_errors("sis_imagenet.py", run)
    if status is not None:
        return status
    if args.dry_run:
        return 0
    from overinterp.pipeline.imagenet import imagenet_markdown

    print()
    print(imagenet_markdown(summary))
    print(f"Results in {config.resolved().out_dir}; MLflow run {summary['mlflow_run_id']} at {config.resolved().tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
