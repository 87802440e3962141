"""The README's commands agree with the code: job flags exist in each job's --help, files exist."""

import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))
README = open(os.path.join(ROOT, "README.md")).read()


def _commands():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]


def test_every_job_command_parses_with_the_jobs_own_parser():
    import sis_cifar10
    import sis_imagenet

    parsers = {"jobs/sis_cifar10.py": sis_cifar10.build_parser(), "jobs/sis_imagenet.py": sis_imagenet.build_parser()}
    seen = set()
    for cmd in _commands():
        words = shlex.split(cmd.split("#")[0])
        for job, parser in parsers.items():
            if job in words:
                parser.parse_args(words[words.index(job) + 1 :])  # exits (fails the test) on an unknown flag
                seen.add(job)
    assert seen == set(parsers)


def test_walkthrough_steps_are_there():
    cmds = "\n".join(_commands())
    for step in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray attach cluster.yaml -p 5000", "ray down cluster.yaml",
                 "ray get-auth-token --generate", "overinterp run", "python -m pytest", "python benchmarks/bench_backselect.py"):
        assert step in cmds, step


@pytest.mark.parametrize("flag", sorted(set(re.findall(r"`(--[a-z][a-z-]+)", README))))
def test_flags_named_in_prose_exist(flag):
    import sis_cifar10
    import sis_imagenet

    from overinterp.cli import build_parser

    ray_flags = {"--working-dir", "--address", "--autoscaling-config"}  # `ray job submit`'s and `ray start`'s own
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    ours = {o for p in (sis_cifar10.build_parser(), sis_imagenet.build_parser(), run) for a in p._actions for o in a.option_strings}
    assert flag in ours | ray_flags, f"README names {flag}, which no command accepts"
