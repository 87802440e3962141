"""Batched Gradient SIS with a pretrained torchvision model on ImageNet-style data, on a Ray cluster.

A preset of `overinterp run` with the paper's ImageNet settings: images stream from --train/--val
(an ImageFolder split, <path>/<class>/<image>, or Parquet of encoded images with columns image and
label; local paths or s3://) through Ray Data to GPU actors that run BGSIS (k = 100, 10% subsets)
with the pretrained --model and write Parquet to --out. Then models are trained from scratch on the
10% subsets (and on random 10% subsets and the subsets' positions alone) as Ray Tune trials (a
process each; with --workers-per-trial N > 1, a Ray Train DDP group of N workers, a GPU each), and
compared with the pretrained model's accuracy in MLflow. Every flag of `overinterp run` works here too (--selectors, --fill, ...).

    ray job submit --working-dir . -- python jobs/sis_imagenet.py \\
        --train s3://BUCKET/imagenet/train --val s3://BUCKET/imagenet/val \\
        --model tv:inception_v3 --weights DEFAULT --image-size 299 \\
        --out s3://BUCKET/overinterp/imagenet --tracking-uri http://127.0.0.1:5000

Rerunning with the same --out resumes: images already in the store and finished trials are skipped.
--smoke-test runs it in a few minutes on 2 CPUs on a tiny synthetic data set written as JPEG/PNG folders
(or, with --smoke-format parquet, as Parquet of encoded images) and tv:resnet18 weights written to
a local file, both removed when it ends (its results stay in --out, by default a new folder in the
temporary directory). Before any work it prints the plan: stages, resources, BGSIS passes and training
images with ETAs from a short calibration; --dry-run stops there, and a plan over --max-hours
(default 24) stops there with faster settings that fit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overinterp.cli import ArgumentParser, HelpFormatter, add_run_arguments, config_from_args, execute  # noqa: E402
from overinterp.config import ConfigError, RunConfig  # noqa: E402

# The paper's ImageNet settings: a pretrained model explained by Batched Gradient SIS (k = 100),
# subsets of the last 10% of pixels, subset models trained from scratch.
DEFAULTS = RunConfig(dataset="imagefolder", pretrained="tv:resnet50", weights="DEFAULT", image_size=224, selectors=("bgsis",), pixels_per_step=100,
                     fraction=0.1, seeds=(0,), epochs=16, batch_size=256, augment=False, input_dropout=0.0,
                     fills=("mean",), stream=True, out_dir="imagenet-out", experiment="overinterp-imagenet", gallery=0)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="sis_imagenet.py", description=__doc__, formatter_class=HelpFormatter)
    add_run_arguments(p, DEFAULTS, dataset_flag=False)
    p.add_argument("--model", dest="pretrained", default=DEFAULTS.pretrained, help="the pretrained torchvision model explained, as tv:<name>")
    p.add_argument("--train-model", dest="models", type=lambda s: (s,), default=(),
                   help="architecture trained on the subsets (default: --model)")
    p.add_argument("--smoke-test", action="store_true", help="tiny synthetic data, tv:resnet18 from a local weights file: a wiring check, minutes on 2 CPUs")
    p.add_argument("--smoke-format", choices=("folder", "parquet"), default="folder", help="--smoke-test data layout")
    return p


def _smoke_inputs(fmt: str, scratch: str) -> dict:
    """Writes the smoke test's data and weights into `scratch`; returns their settings."""
    import torch

    from overinterp.models import create_model
    from overinterp.synthetic import write_encoded_parquet, write_imagefolder

    if fmt == "folder":
        write_imagefolder(scratch, n_per_class=4, num_classes=3, size=40)
        train, val = os.path.join(scratch, "train"), os.path.join(scratch, "val")
    else:
        train, val = os.path.join(scratch, "train.parquet"), os.path.join(scratch, "val.parquet")
        write_encoded_parquet(train, n=12, num_classes=3, size=40, seed=0)
        # an odd count: split across two DDP workers in equal shares, one image would be dropped
        write_encoded_parquet(val, n=11, num_classes=3, size=40, seed=1)
    weights = os.path.join(scratch, "resnet18-3class.pt")
    torch.manual_seed(0)
    torch.save(create_model("tv:resnet18", num_classes=3).state_dict(), weights)
    return dict(train=train, val=val, pretrained="tv:resnet18", weights=weights, image_size=32, pixels_per_step=64, epochs=1,
                batch_size=8, select_batch=6, **({"num_classes": 3} if fmt == "parquet" else {}))  # a folder's are its class folders


def config_fields(parser: argparse.ArgumentParser, args: argparse.Namespace, scratch: str | None = None) -> dict:
    """RunConfig's fields from the parsed flags; with --smoke-test, the smoke inputs (written into
    `scratch`) are the defaults and any flag the user gave (--epochs 4, --out DIR) wins. The smoke's
    results go to a folder of their own in the temp directory unless --out is given."""
    fields = {k: v for k, v in vars(args).items() if k in RunConfig.__dataclass_fields__}
    if args.smoke_test:
        smoke = _smoke_inputs(args.smoke_format, scratch)
        if fields["out_dir"] == parser.get_default("out_dir"):
            smoke["out_dir"] = os.path.join(tempfile.mkdtemp(prefix="sis_imagenet-smoke-"), "out")
        fields.update({k: v for k, v in smoke.items() if k not in fields or fields[k] == parser.get_default(k)})
    return fields


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.smoke_test and not (args.train and args.val):
        parser.print_usage(sys.stderr)
        print("sis_imagenet.py: error: --train and --val are required (or --smoke-test)", file=sys.stderr)
        return 2
    # the smoke test's data and weights (43 MB) are removed when it ends; its results stay in --out
    with tempfile.TemporaryDirectory(prefix="sis_imagenet-smoke-inputs-") if args.smoke_test else contextlib.nullcontext() as scratch:
        try:
            config = config_from_args(argparse.Namespace(), **config_fields(parser, args, scratch))
        except ConfigError as e:
            print(f"sis_imagenet.py: error: {e}", file=sys.stderr)
            return 2
        return execute(config, args.ray_address or os.environ.get("RAY_ADDRESS"), prog="sis_imagenet.py", dry_run=args.dry_run,
                       verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
