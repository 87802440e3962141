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


def _linked_files() -> set[str]:
    """Repo files the README points a reader to: Markdown link and image targets (not URLs or
    anchors), backticked `docs/...` paths, and the top-level `*.md` documents it names."""
    links = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", README) if not re.match(r"[a-z]+:|#", t)}
    return links | set(re.findall(r"`(docs/[^`\s]+)`", README)) | set(re.findall(r"\b([A-Z][A-Z_]+\.md)\b", README))


def test_every_file_the_readme_links_exists():
    linked = _linked_files()
    assert {"docs/mlflow-runs.png", "docs/paper.md", "BENCHMARKS.md", "RELIABILITY.md"} <= linked, sorted(linked)
    missing = [f for f in sorted(linked) if not os.path.isfile(os.path.join(ROOT, f))]
    assert not missing, f"README links files that are not in the repo: {missing}"


def test_nothing_points_outside_the_repo():
    """Users get the repo, not the workspace around it: no `../shared` in the README, docs/ or the code."""
    paths = [os.path.join(ROOT, "README.md")]
    for top in ("docs", "overinterp"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            paths += [os.path.join(d, f) for f in files if f.endswith((".md", ".py", ".txt", ".yaml", ".json"))]
    assert len(paths) > 10
    offenders = [os.path.relpath(p, ROOT) for p in paths if "../shared" in open(p, encoding="utf-8").read()]
    assert not offenders, f"these reference ../shared, which users never get: {offenders}"
