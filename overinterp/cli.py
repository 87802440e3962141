"""`overinterp run`: the whole pipeline from the command line, on any source.

One parser for every entry point: jobs/sis_cifar10.py and jobs/sis_imagenet.py are presets of the
paper's settings over `add_run_arguments`. Flags are turned into a RunConfig (checked on
construction); the checks that touch the world run once in the driver's preflight. A bad value is
one line on stderr naming the fix, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from overinterp.config import (DEFAULT_AUGMENT, DEFAULT_EPOCHS, DEFAULT_IMAGE_SIZE, IN_MEMORY_SELECT_BATCH, MAX_SELECT_BATCH, SMOKE_EPOCHS,
                               SMOKE_IMAGE_SIZE, SMOKE_MAX_PASSES, SMOKE_SIZES, ConfigError, RunConfig, streamed_select_batch)
from overinterp.explain import GUIDANCE_METHODS

# What a run does with a flag left unset where the config leaves the choice to the run (a None,
# False or empty default); a flag a preset gives a value shows that value instead.
UNSET_DEFAULTS = {
    "models": "the data set's; with --pretrained, that model",
    "image_size": str(DEFAULT_IMAGE_SIZE),
    "num_classes": "1000 for Parquet; a folder's are its class folders",
    "max_images": "all",
    "stream": "decided by the data set's size; Parquet and --train/--val stream",
    "epochs": "per data set: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items()) + f"; {SMOKE_EPOCHS} with --smoke",
    "augment": "on for " + ", ".join(k for k, v in DEFAULT_AUGMENT.items() if v) + "; off for " + ", ".join(k for k, v in DEFAULT_AUGMENT.items() if not v),
    "select_batch": f"streamed runs size it by the image: {streamed_select_batch(224)} at 224 px, {streamed_select_batch(299)} at 299, "
                    f"up to {MAX_SELECT_BATCH:,} for small images; in memory {IN_MEMORY_SELECT_BATCH}",
    "autocast": "off (fp32)",
    "tracking_uri": "$MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db",
    "explain": "none",
    "strict": "skip it and list it in summary.json",
    "ray_address": "local Ray, or RAY_ADDRESS",
    "max_workers": "what the cluster can offer",
    "gpus_per_worker": "1 where GPUs can exist",
    "cpus_per_worker": "1",
    "gpus_per_trial": "1 where GPUs can exist",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with its default: the value given (an entry point's own, so a job's
    --help shows its preset), or for a flag left unset, what the run decides (UNSET_DEFAULTS).
    The docstrings above the flags keep their line breaks (the jobs' examples)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").replace(" (default: %(default)s)", "")  # BooleanOptionalAction adds its own
        d = action.default
        if not action.option_strings or d is argparse.SUPPRESS or "(default" in text:
            return text  # an argument, --help, or a flag whose help says its default itself
        if d is None or (d is False and not isinstance(action, argparse.BooleanOptionalAction)) or (isinstance(d, (tuple, dict)) and not d):
            shown = UNSET_DEFAULTS.get(action.dest)
        elif isinstance(d, bool):
            shown = "on" if d else "off"
        elif isinstance(d, tuple):
            shown = ",".join(map(str, d))
        elif isinstance(d, dict):
            shown = "'" + json.dumps(d) + "'"
        else:
            shown = str(d)
        return text if shown is None else f"{text} (default: {shown.replace('%', '%%')})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a flag it cannot parse is one line (`<prog>: error: ...`, exit 2) as every other
    bad input is, pointing to --help instead of printing the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog.split()[0]}: error: {message} (see {self.prog} --help)\n")


def _csv(kind, name: str = ""):
    """Parse 'a,b,c' into a tuple of kind; with a name, an empty list is refused (the flag would
    silently mean its default)."""
    def parse(s: str):
        try:
            values = tuple(kind(v) for v in s.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {s!r}")
        if name and not values:
            raise argparse.ArgumentTypeError(f"needs at least one {name} (leave the flag out for the default)")
        return values

    return parse


def _json_object(s: str) -> dict:
    try:
        value = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r} ({e.msg})")
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(f'expected a JSON object of objects such as {{"ig": {{"n_steps": 20}}}}, got {s!r}')
    return value


def add_run_arguments(r: argparse.ArgumentParser, d: RunConfig = RunConfig(), dataset_flag: bool = True) -> None:
    """The flags of a pipeline run, with defaults from `d` (the jobs pass their own)."""
    s = r.add_argument_group("source", "a named data set, or --train/--val paths or URIs (s3://...)")
    if dataset_flag:
        s.add_argument("--dataset", default=d.dataset, help="digits (embedded), cifar10, cifar100, imagefolder, parquet")
    s.add_argument("--data-root", default=d.data_root,
                   help="folder of the data set: CIFAR's files; imagefolder: train/<class>/ and val/<class>/; parquet: train.parquet and val.parquet (files or folders of files)")
    s.add_argument("--train", default=d.train, help="train images: an ImageFolder split (<path>/<class>/<image>) or Parquet of encoded images")
    s.add_argument("--val", default=d.val, help="validation images, same layout as --train")
    s.add_argument("--download", action="store_true", help="download CIFAR into --data-root (needs internet)")
    s.add_argument("--image-size", type=int, default=d.image_size, help="imagefolder/parquet: square crop side")
    s.add_argument("--num-classes", type=int, default=d.num_classes, help="classes of a Parquet source")
    s.add_argument("--max-images", type=int, default=d.max_images, help="per split: a pilot on the first N images")
    s.add_argument("--stream", action=argparse.BooleanOptionalAction, default=d.stream,
                   help="stream the images through Ray Data")
    r.add_argument("--models", type=_csv(str, "model name"), default=d.models, help="comma-separated model names (see `overinterp models`)")
    r.add_argument("--pretrained", default=d.pretrained,
                   help="explain this trained model instead of training full-image models; it is the baseline: a torchvision model "
                        "(tv:<name>), or a registered one (digits_cnn, resnet20, ...) with --weights FILE")
    r.add_argument("--weights", default=d.weights, help="the explained model's weights: a state_dict file, or for tv:<name> DEFAULT or an enum name (ResNet50_Weights.IMAGENET1K_V2)")
    r.add_argument("--seeds", type=_csv(int), default=d.seeds, help="comma-separated training seeds")
    r.add_argument("--fraction", type=float, default=d.fraction, help="pixel-subset size as a fraction of pixels, in (0, 1]")
    r.add_argument("--tau", type=float, default=d.tau, help="SIS confidence threshold, in [0, 1]")
    r.add_argument("--input-dropout", type=float, default=d.input_dropout, help="p of the input-dropout variant (0 disables it)")
    r.add_argument("--selectors", "--selector", dest="selectors", type=_csv(str), default=d.selectors,
                   help="comma-separated pixel selectors to compare, the first one primary: backselect (backward selection, exact at "
                        "k = 1), bgsis (Batched Gradient SIS, for large images), perturbation (meaningful perturbation), gradient, "
                        "ig (integrated gradients), occlusion, or captum:<ClassName> (any captum.attr method)")
    r.add_argument("--selector-options", type=_json_object, default=d.selector_options,
                   help='JSON: selector -> its parameters, e.g. \'{"ig": {"n_steps": 20}, "perturbation": {"iterations": 100}}\'')
    r.add_argument("--pixels-per-step", type=int, default=d.pixels_per_step, help="k pixels removed per selection step (backselect: 1 = exact)")
    r.add_argument("--exact-tail", type=float, default=d.exact_tail,
                   help="F in (0, 1]: backselect/bgsis remove k pixels per step until F·HW remain, then exact backward selection (1: off)")
    r.add_argument("--fill", dest="fills", type=_csv(str), default=d.fills,
                   help="comma-separated: how removed pixels look to subset models: mean (0 after normalisation, the paper) "
                        "and/or road (noisy linear imputation, so the mask's shape leaks less); positions-only runs beside them")
    r.add_argument("--compile", action="store_true", help="torch.compile the model for selection (~2x on CPU for ResNets, ~30 s to compile)")
    r.add_argument("--autocast", choices=("bf16", "fp16"), default=None, help="GPU selection under autocast: faster, not exact (see BENCHMARKS.md)")
    r.add_argument("--random-seed", type=int, default=d.random_seed, help="seed of the random-subset baseline")
    r.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    r.add_argument("--batch-size", type=int, default=d.batch_size, help="training images per SGD step (per worker in DDP)")
    r.add_argument("--lr", type=float, default=d.lr,
                   help="SGD learning rate (Nesterov momentum 0.9; ×0.2 at 30%%, 60%% and 80%% of the epochs)")
    r.add_argument("--workers-per-trial", type=int, default=d.workers_per_trial, help="streamed runs: Ray Train workers (DDP) per trial")
    r.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d.augment, help="random crop + flip")
    r.add_argument("--select-batch", type=int, default=d.select_batch, help="images per selection task and Parquet shard")
    r.add_argument("--out", dest="out_dir", default=d.out_dir, help="output directory or URI (s3://...); rerun with the same one to resume")
    r.add_argument("--tracking-uri", default=d.tracking_uri, help="MLflow tracking URI")
    r.add_argument("--experiment", default=d.experiment, help="MLflow experiment name")
    r.add_argument("--gallery", type=int, default=d.gallery, help="test images in gallery.png")
    e = r.add_argument_group("explain", "guided generation under a diffusion prior: what the models learned to look for")
    e.add_argument("--explain", type=_csv(str), default=d.explain,
                   help="comma-separated questions: vce (what change turns a test image into each other class), disagree "
                        "(where the full-image and subset models, input dropout, and two seeds disagree most)")
    e.add_argument("--explain-method", choices=GUIDANCE_METHODS, default=d.explain_method,
                   help="guidance: noise (optimise the start noise through the DDIM chain, DiG-IN) or universal (~40x faster, less real)")
    e.add_argument("--explain-images", type=int, default=d.explain_images, help="test images explained; images per model pair and direction")
    e.add_argument("--prior-steps", type=int, default=d.prior_steps, help="training steps of the diffusion prior (cached and resumed in --out)")
    e.add_argument("--generator", default=d.generator,
                   help="a diffusers pixel-space pipeline (folder from save_pretrained, or a hub id) in place of the trained prior")
    r.add_argument("--smoke", action="store_true",
                   help=f"a wiring check on any data set: {SMOKE_SIZES[0]} train / {SMOKE_SIZES[1]} test images, {SMOKE_EPOCHS} epochs, small models "
                        f"(digits_cnn; resnet20 otherwise), ImageFolder images at {SMOKE_IMAGE_SIZE} px, and k raised until "
                        f"backselect/bgsis plan at most {SMOKE_MAX_PASSES:,} forward passes per image")
    r.add_argument("--max-hours", type=float, default=d.max_hours,
                   help="refuse to start when the planned ETA is longer (0: no limit); the error names faster settings")
    r.add_argument("--dry-run", action="store_true", help="print the plan (stages, resources, forward passes, ETA) and exit")
    r.add_argument("--strict", action="store_true", help="stop at the first image that does not decode")
    r.add_argument("--ray-address", default=None, help="Ray cluster address")
    r.add_argument("-v", "--verbose", action="store_true", help="also print Ray's, Tune's and MLflow's logs, and one line per trial")
    # overrides of the resource plan (by default planned from what the cluster can offer)
    g = r.add_argument_group("resources", "default: planned from the autoscaler's node types (or the nodes up); see README")
    g.add_argument("--max-workers", type=int, default=None, help="most selection actors, and most trials at once")
    g.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per selection actor (0: CPUs only)")
    g.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per selection actor")
    g.add_argument("--gpus-per-trial", type=float, default=None, help="GPUs per training trial (0.5 lets two share one); streamed runs: per Ray Train worker, at most 1")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="overinterp", description="Find out whether image classifiers overinterpret their inputs (Carter et al., NeurIPS 2021).")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train -> backward selection -> train on pixel-subsets -> compare",
                       formatter_class=HelpFormatter)
    add_run_arguments(r)
    sub.add_parser("models", help="list the model names --models accepts")
    st = sub.add_parser("store", help="check or repair the Parquet store of a run's --out")
    st.add_argument("action", choices=("check", "repair"),
                    help="check: rows, repeated rows, missing ids, unreadable files per selection; "
                         "repair: quarantine unreadable files and rewrite overlapping shards (never deletes data)")
    st.add_argument("--out", dest="out_dir", required=True, help="the run's output directory or URI")
    return p


def config_from_args(args: argparse.Namespace, **fixed) -> RunConfig:
    """RunConfig from parsed run flags; `fixed` sets fields a job does not expose as flags."""
    known = set(RunConfig.__dataclass_fields__)
    fields = {k: v for k, v in vars(args).items() if k in known}
    return RunConfig(**{**fields, **fixed})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "models":
        from overinterp.models import model_names

        print("\n".join(model_names()))
        return 0
    if args.command == "store":
        return store_command(args.action, args.out_dir)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"overinterp: error: {e}", file=sys.stderr)
        return 2
    return execute(config, args.ray_address, dry_run=args.dry_run, verbose=args.verbose)


def store_command(action: str, out: str) -> int:
    """`overinterp store check|repair --out DIR`: exit 0 when the store is clean (after repair).

    repair holds the --out's lock (a run or another repair on it is refused, exit 2); check only
    reads, so it runs beside a live run, with a warning that the store may be changing. Errors are
    one line, as `one_line_errors` maps them (an unreachable URI: exit 2)."""

    def work() -> int:
        from overinterp import fs
        from overinterp.pipeline.lock import LockHeld, OutputLock
        from overinterp.store.check import check_store, repair_store, report_table

        try:
            has_store = fs.exists(fs.join(out, "selections"))
        except (OSError, ValueError) as e:  # pyarrow's errors derive from these
            raise ConfigError(f"--out {out} cannot be reached ({_first_line(e)}): check the URI and this machine's credentials") from e
        if not has_store:
            raise ConfigError(f"{out} holds no selections/ folder: give the --out of a run")

        def check() -> int:
            reports = check_store(out)
            print(report_table(reports))
            bad = [r for r in reports if not r.ok]
            print(f"{len(bad)} of {len(reports)} selections need attention"
                  + ("; missing ids are redone by rerunning the same command" if any(r.missing for r in bad) else "")
                  if bad else f"all {len(reports)} selections are consistent")
            return 1 if bad else 0

        if action == "check":
            try:
                OutputLock(out).check_free()
            except LockHeld as e:
                print(f"overinterp: warning: {e}; the store may change while it is checked", file=sys.stderr)
            return check()
        with OutputLock(out, "overinterp store repair"):
            actions = repair_store(out)
            print("\n".join(actions) if actions else "nothing to repair")
            return check()

    status, result = one_line_errors("overinterp", work)
    return result if status is None else status


def one_line_errors(prog: str, fn):
    """Run fn(); a bad setting (ConfigError) is one line on stderr and exit 2; bad files or data
    (a corrupt shard or image, an unreadable data set, failed trials) one line and exit 1. Anything
    else is a bug and keeps its traceback. A stop (Ctrl-C, SIGTERM, SIGINT) is one line and exit 128 + the
    signal. Returns (exit status or None, fn's result)."""
    from overinterp.costplan import BudgetExceeded
    from overinterp.data import DataError
    from overinterp.models import ModelError
    from overinterp.fs import OutputError
    from overinterp.store import StoreError

    try:
        return None, fn()
    except KeyboardInterrupt as e:  # Ctrl-C, or the driver's RunStopped (SIGTERM / SIGINT)
        print(f"{prog}: stopped by {(e.args or ('SIGINT',))[0]}: finished work is kept in --out; rerun the same command to continue",
              file=sys.stderr)
        return 128 + getattr(e, "signum", 2), None
    except Exception as e:
        if isinstance(e, (ConfigError, BudgetExceeded, ModelError)):
            status = 2
        # TrialsFailed: pipeline.tune_stage, not imported here: Ray loads only once input is valid
        elif isinstance(e, (DataError, StoreError, OutputError)) or type(e).__name__ == "TrialsFailed":
            status = 1
        else:
            raise
        print(f"{prog}: error: {_first_line(e)}", file=sys.stderr)
        return status, None


def _first_line(e: Exception) -> str:
    e = getattr(e, "cause", None) or e  # Ray wraps errors raised in workers; the user's line is the cause's
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def execute(config: RunConfig, ray_address: str | None = None, prog: str = "overinterp", dry_run: bool = False,
            verbose: bool = False) -> int:
    """Check, run the pipeline (or only plan it), print the tables; errors as `one_line_errors` says."""
    from overinterp.report import summary_markdown

    def run():
        from overinterp.pipeline import terminal

        terminal.configure(verbose)
        from overinterp.pipeline.driver import run as run_pipeline  # Ray/MLflow load only once the flags are valid

        return run_pipeline(config, ray_address=ray_address, dry_run=dry_run, holder=prog)

    status, summary = one_line_errors(prog, run)
    if status is not None:
        return status
    if dry_run:
        return 0
    print()
    print(summary_markdown(summary))
    resolved = config.resolved()
    ui = f"mlflow ui --backend-store-uri {resolved.tracking_uri}" if resolved.tracking_uri.startswith("sqlite") else resolved.tracking_uri
    print(f"Results in {resolved.out_dir} (summary.json, summary.md, gallery.png); MLflow run {summary['mlflow_run_id']}: {ui}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
