"""The command line: bad input is one line naming the fix, before any work starts."""

import os
import re
import subprocess
import sys

import pytest

from overinterp.cli import build_parser, config_from_args, main

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))

import sis_cifar10  # noqa: E402
import sis_imagenet  # noqa: E402


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--dataset", "mnist"], "unknown data set 'mnist'"),
        (["--models", "resnet21"], "unknown model 'resnet21'"),
        (["--fraction", "0"], "--fraction must be in (0, 1]"),
        (["--fraction", "1.2"], "--fraction"),
        (["--tau", "2"], "--tau must be in [0, 1]"),
        (["--dataset", "cifar10"], "--data-root"),
        (["--dataset", "cifar10", "--data-root", "/no/such/dir"], "does not exist"),
        (["--selectors", "backselect,saliency"], "unknown selector 'saliency'"),
        (["--selectors", "captum:NoSuchMethod"], "NoSuchMethod"),
        (["--selectors", "backselect,backselect"], "--selectors needs distinct"),
        (["--selector-options", '{"ig": {"n_steps": 0}}', "--selectors", "ig"], "n_steps"),
        (["--selector-options", '{"ig": {"n_steps": 5}}', "--selectors", "backselect"], "which --selectors does not run"),
        (["--fill", "road,blur"], "--fill takes distinct values from mean, road"),
        (["--exact-tail", "0"], "--exact-tail must be in (0, 1]"),
        (["--exact-tail", "1.5"], "--exact-tail"),
        (["--pixels-per-step", "0"], "--pixels-per-step must be an integer >= 1"),
    ],
)
def test_bad_input_is_one_line_before_work(argv, match, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("overinterp: error: ") and match in err and err.count("\n") == 1
    assert not out.exists()  # nothing was started


def test_flags_become_the_config():
    args = build_parser().parse_args(["run", "--models", "resnet20,vgg16_bn", "--seeds", "3,4", "--fraction", "0.1", "--no-augment"])
    c = config_from_args(args)
    assert c.models == ("resnet20", "vgg16_bn") and c.seeds == (3, 4) and c.fraction == 0.1 and c.augment is False
    args = build_parser().parse_args(["run", "--selectors", "gradient,captum:InputXGradient", "--fill", "road", "--exact-tail", "0.1",
                                      "--selector-options", '{"gradient": {}}'])
    c = config_from_args(args)
    assert c.selectors == ("gradient", "captum:InputXGradient") and c.fills == ("road",) and c.exact_tail == 0.1
    assert c.selection_params() == {"gradient": {}, "captum:InputXGradient": {"importance": "signed"}}
    old = config_from_args(build_parser().parse_args(["run", "--selector", "bgsis", "--pixels-per-step", "4", "--exact-tail", "0.5"]))
    assert old.selectors == ("bgsis",) and old.selection_params() == {"bgsis": {"k": 4, "tail": 0.5, "keep": 0.05}}  # the old flag still works


def _flag_help(parser) -> dict:
    """{first option string: its help as --help prints it, on one line}."""
    text = parser.format_help()
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    blocks = [b.split("\n\n", 1)[0] for b in blocks if b.startswith("-")]  # a group's title follows a blank line
    return {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks}


def test_help_shows_each_default_once_as_typed():
    run = _flag_help(build_parser()._subparsers._group_actions[0].choices["run"])
    assert not any("(default: None)" in h or "(default: ())" in h or h.count("(default") > 1 for h in run.values())
    assert run["--seeds"].endswith("(default: 0,1,2)")  # as the flag takes it, not a Python tuple
    assert run["--epochs"].endswith("(default: per data set: digits 30, cifar10 200, cifar100 200, imagefolder 90, parquet 90; 2 with --smoke)")
    assert run["--augment"].endswith("(default: on for cifar10, cifar100, imagefolder, parquet; off for digits)")  # unset: what the run decides
    assert run["--lr"].endswith("(default: 0.1)") and "30%, 60% and 80%" in run["--lr"]
    imagenet, cifar = _flag_help(sis_imagenet.build_parser()), _flag_help(sis_cifar10.build_parser())
    assert imagenet["--epochs"].endswith("(default: 16)") and imagenet["--stream"].endswith("(default: on)")  # the preset's own
    assert imagenet["--train-model"].endswith("(default: --model)") and imagenet["--augment"].endswith("(default: off)")
    assert cifar["--models"].endswith("(default: resnet20,resnet18,vgg16_bn)")


def test_console_script_fails_fast_without_ray():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    code = "import sys; from overinterp.cli import main; rc = main(['run', '--tau', '-1']); assert 'ray' not in sys.modules and 'mlflow' not in sys.modules; sys.exit(rc)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == "overinterp: error: --tau must be in [0, 1], got -1.0 (the paper uses 0.99)"


def test_models_command_lists_names(capsys):
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert "resnet20" in names and "tv:resnet50" in names


def test_store_check_and_repair_commands(tmp_path, capsys):
    import json

    import numpy as np
    import torch

    from overinterp import store

    root = str(tmp_path / "selections")
    for ids in ([0, 1], [1, 2]):  # image 1 twice, identical rows
        store.write_rows(root, model="m", selector="backselect", selector_params=json.dumps({}), split="test", image_id=np.array(ids),
                         label=np.zeros(2), order=torch.arange(4).expand(2, 4), height=2, width=2)
    assert main(["store", "check", "--out", str(tmp_path)]) == 1
    assert "| m | backselect | test | 3 | 2 | 1 | 0 | 0 | 0 |" in capsys.readouterr().out
    assert main(["store", "repair", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "rewrote" in printed and "all 1 selections are consistent" in printed
    assert main(["store", "check", "--out", str(tmp_path / "nothing")]) == 2
    assert "holds no selections/ folder" in capsys.readouterr().err


def test_smoke_with_a_tail_past_its_pass_bound_is_refused_in_one_line(tmp_path, capsys):
    """`--smoke --exact-tail 0.5` on a folder planned 8,513 passes per image at 16 px, above the
    5,000 --help states: now a one-line error naming the fix, before any work."""
    import os

    from overinterp.synthetic import write_imagefolder

    write_imagefolder(str(tmp_path / "f"), n_per_class=2, num_classes=2, size=20)
    out = tmp_path / "out"
    code = main(["run", "--smoke", "--dataset", "imagefolder", "--data-root", str(tmp_path / "f"), "--exact-tail", "0.5", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "backselect plans 8,513 at 16×16 px" in err and "use --exact-tail 0.37 or less with --smoke" in err
    assert not os.path.exists(out)


def _store_with_a_repeat(tmp_path):
    import numpy as np
    import torch

    from overinterp import store

    for ids in ([0, 1], [1, 2]):  # image 1 twice, identical rows
        store.write_rows(str(tmp_path / "selections"), model="m", selector="backselect", selector_params="{}", split="test",
                         image_id=np.array(ids), label=np.zeros(2), order=torch.arange(4).expand(2, 4), height=2, width=2)


def _files(root) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_store_repair_is_refused_while_a_run_holds_the_out(tmp_path, capsys):
    from overinterp.pipeline.lock import OutputLock

    _store_with_a_repeat(tmp_path)
    with OutputLock(str(tmp_path), "overinterp run"):
        before = _files(tmp_path)
        assert main(["store", "repair", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"overinterp: error: {tmp_path} is in use by another run (overinterp run on host ") and err.count("\n") == 1
        assert f"pid {os.getpid()}" in err and _files(tmp_path) == before  # nothing repaired, nothing quarantined
        assert main(["store", "check", "--out", str(tmp_path)]) == 1  # check only reads: it runs, with a warning
        captured = capsys.readouterr()
        assert captured.err.startswith("overinterp: warning: ") and "the store may change while it is checked" in captured.err
        assert "| m | backselect | test | 3 | 2 | 1 | 0 | 0 | 0 |" in captured.out
    assert main(["store", "repair", "--out", str(tmp_path)]) == 0  # once the run is gone
    assert not (tmp_path / ".overinterp.lock").exists()


def test_store_commands_on_an_unreachable_uri_are_one_line(capsys, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for action in ("check", "repair"):
        assert main(["store", action, "--out", "s3://no-such-bucket/x?endpoint_override=127.0.0.1:9&scheme=http"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("overinterp: error: --out s3://no-such-bucket/x") and err.count("\n") == 1
        assert "cannot be reached" in err and "credentials" in err
