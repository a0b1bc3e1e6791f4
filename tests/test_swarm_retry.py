"""A swarm setup that failed does not block the next one: the driver's repository says which branches exist, and
a branch that only a worker's clone kept (from the failed setup) is dropped when the clone is brought in line.
Every error a worker raises reaches the user as one line. Real Ray, real git, real training of a few seconds."""

import re
import shutil
import subprocess

import git
import pytest

from conftest import BUDGET, cli, make_repo

pytestmark = pytest.mark.serial  # Ray places a worker per share of the cores

pytest.importorskip("ray")


def swarm(root, cache, *extra):
    return cli(root, "--backend", "mlx", "swarm", "--workers", 2, "--budget", BUDGET, "--gate", "greedy",
               "--agent", "random", "--tag", "sw", "--noise-runs", 1, "--no-calibrate", *extra,
               env={"AUTORESEARCH_CACHE": str(cache)})


def one_line_error(proc):
    """The failure as the user sees it: one `error:` line, no traceback, no colour codes, no Ray task header."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "\x1b[" not in out and "ray::" not in out and "pid=" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    return errors[0]


def commit_train(root, text, message):
    train = root / "backends/mlx/train.py"
    train.write_text(text)
    repo = git.Repo(root)
    repo.index.add(["backends/mlx/train.py"])
    repo.index.commit(message)


def test_a_failed_setup_then_a_retry_with_the_same_tag_from_a_fresh_clone(tmp_path, cpu_cache):
    root = make_repo(tmp_path / "project", backends=("mlx",))
    good = (root / "backends/mlx/train.py").read_text()
    commit_train(root, 'raise SystemExit("train.py breaks before its first step")\n' + good, "a train.py that crashes")

    failed = swarm(root, cpu_cache, "-n", 0)
    assert failed.returncode == 4, failed.stdout + failed.stderr  # the baseline crashed: exit 4, as setup gives it
    line = one_line_error(failed)
    print(line)
    assert line.startswith("error: setup on w0 failed, run branch autoresearch/sw-mlx-cpu-"), line
    assert "not set up" in line and "crash" in line and "/w0/.autoresearch/last_crash.log" in line, line
    repo = git.Repo(root)
    assert repo.active_branch.name == "main" and not [h for h in repo.heads if h.name.startswith("autoresearch/")]
    assert not repo.is_dirty(untracked_files=True)

    # worker w0's clone: where the failed setup ran. A setup killed there (or one that recorded its crashed
    # baseline) leaves the branch behind; that is the state a retry meets
    clone = next(re.search(r"^w0: pid \d+ on .*, clone (\S+)$", text).group(1)
                 for text in failed.stdout.splitlines() if text.startswith("w0: pid"))
    name = re.search(r"run branch (\S+) not set up", line).group(1)
    leftover = git.Repo(clone)
    if name not in leftover.heads:
        leftover.create_head(name)
    assert name in leftover.heads

    # the retry, from a fresh clone at the same path (the same workers' clones), with a train.py that works
    shutil.move(root, tmp_path / "first")
    subprocess.run(["git", "clone", "--quiet", str(tmp_path / "first"), str(root)], check=True)
    fresh = git.Repo(root)
    with fresh.config_writer() as c:
        c.set_value("user", "name", "t").set_value("user", "email", "t@localhost")
    commit_train(root, good, "train.py fixed")
    retried = swarm(root, cpu_cache, "-n", 1)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    print(retried.stdout)
    assert "setup on w0: " in retried.stdout and "set up on the workers' hardware" in retried.stdout
    assert fresh.active_branch.name == name and "swarm ended: " in retried.stdout

    # the driver's checks still refuse a tag the driver's own repository already has, in one line
    again = swarm(root, cpu_cache, "-n", 0)
    assert again.returncode == 2, again.stdout + again.stderr
    assert one_line_error(again) == (f"error: branch {name} already exists: choose another --tag, or check it out "
                                     f"and run the swarm on it without --tag")
