"""The paper's CIFAR-10 study on a Ray cluster (or a local Ray).

ResNet20, ResNet18 and VGG16-BN over several seeds, their mean ensembles and input-dropout
variants; backward selection on all 60,000 images (GPU actors where the cluster has GPUs);
models trained on the 5% BS subsets and on random 5% subsets; the paper's Table 1.

    ray job submit --working-dir . -- python jobs/sis_cifar10.py \\
        --data-root /home/ray/data/cifar --out s3://BUCKET/overinterp/cifar10 --tracking-uri http://127.0.0.1:5000

Rerunning with the same --out resumes: finished trials and selected images are not redone.
--smoke-test runs the whole job in a few minutes on 2 CPUs, on a tiny synthetic data set written in
CIFAR-10's real on-disk format (Batched Gradient SIS instead of exact BS, 1 epoch), removed when it
ends (its results stay in --out, by default a new folder in the temporary directory).
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

DEFAULTS = RunConfig(dataset="cifar10", models=("resnet20", "resnet18", "vgg16_bn"), seeds=(0, 1, 2), out_dir="cifar10-out", select_batch=16)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="sis_cifar10.py", description=__doc__, formatter_class=HelpFormatter)
    add_run_arguments(p, DEFAULTS, dataset_flag=False)
    p.add_argument("--smoke-test", action="store_true", help="tiny synthetic CIFAR-10 files: a wiring check, minutes on 2 CPUs")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke_test and args.data_root != DEFAULTS.data_root:
        print("sis_cifar10.py: error: --smoke-test runs on CIFAR-10 files it writes itself: drop --data-root, or check the wiring "
              "on your data with --smoke", file=sys.stderr)
        return 2
    fixed = {"dataset": "cifar10"}
    # the smoke test's data is removed when it ends; its results stay in --out
    with tempfile.TemporaryDirectory(prefix="sis_cifar10-smoke-inputs-") if args.smoke_test else contextlib.nullcontext() as scratch:
        if args.smoke_test:
            from overinterp.synthetic import write_cifar

            write_cifar(scratch, n_train=20, n_test=10)
            fixed.update(data_root=scratch, smoke=True, models=("resnet20",), seeds=(0, 1), epochs=1,
                         selectors=("bgsis",), fills=("mean",), pixels_per_step=128, select_batch=8, gallery=2)
            if args.out_dir == DEFAULTS.out_dir:
                fixed["out_dir"] = os.path.join(tempfile.mkdtemp(prefix="sis_cifar10-smoke-"), "out")
        try:
            config = config_from_args(args, **fixed)
        except ConfigError as e:
            print(f"sis_cifar10.py: error: {e}", file=sys.stderr)
            return 2
        return execute(config, args.ray_address or os.environ.get("RAY_ADDRESS"), prog="sis_cifar10.py", dry_run=args.dry_run,
                       verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
