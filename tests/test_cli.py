"""What a new user runs first: `vla --help` and every subcommand's help."""

import subprocess
import sys

import pytest

from vla.cli import main

SUBCOMMANDS = ["demo", "collect", "experts", "bench-sim", "bench", "bench-record", "serve", "keygen", "node", "run",
               "record", "import-bag", "teleop", "train", "eval"]


def test_vla_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "vla.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr  # an unescaped "95%" once made this a TypeError
    for name in SUBCOMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"usage: vla {name}" in capsys.readouterr().out


def test_help_needs_no_torch():
    """The command line only declares the jobs: `vla --help` must not load torch, MuJoCo or ROS."""
    code = "import sys; from vla.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "print(sorted(m for m in ('torch', 'mujoco', 'rclpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_the_command_lines_copies_match_the_library():
    from vla import cli
    from vla.jobs.suites import SUITES
    from vla.sim import EVAL_SEED_START

    assert cli.EVAL_SEED_START == EVAL_SEED_START and tuple(cli.SUITES) == SUITES


def test_every_subcommand_names_a_function_that_exists():
    import argparse
    import importlib

    from vla import cli

    jobs = []
    original = argparse.ArgumentParser.set_defaults

    def record(self, **kwargs):
        if "job" in kwargs:
            jobs.append(kwargs["job"])
        return original(self, **kwargs)

    argparse.ArgumentParser.set_defaults = record
    try:
        with pytest.raises(SystemExit):
            cli.main(["--help"])
    finally:
        argparse.ArgumentParser.set_defaults = original
    assert len(jobs) == len(SUBCOMMANDS)
    for job in jobs:
        module, _, function = job.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), job


def test_keygen_writes_a_public_key_and_a_private_secret(tmp_path):
    import os
    import stat

    import zmq

    assert main(["keygen", str(tmp_path / "robot1")]) == 0
    public = (tmp_path / "robot1.key").read_text().strip().encode()
    secret = (tmp_path / "robot1.key_secret").read_text().strip().encode()
    assert zmq.curve_public(secret) == public
    assert stat.S_IMODE(os.stat(tmp_path / "robot1.key_secret").st_mode) == 0o600
    assert main(["keygen", str(tmp_path / "robot1")]) == 2  # never overwrites without --force
