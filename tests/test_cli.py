"""What a new user runs first: `vla --help` and every subcommand's help."""

import subprocess
import sys

import pytest

from vla.cli import main

SUBCOMMANDS = ["demo", "collect", "experts", "bench-sim", "bench", "serve", "keygen", "node", "run", "train", "eval"]


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
