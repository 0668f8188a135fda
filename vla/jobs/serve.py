"""`vla serve` (a policy behind the zmq server) and `vla keygen` (CURVE key pairs for it and its clients).

`python -m vla.jobs.serve` reads a ServeConfig as JSON on stdin: how the policy node starts its own
server process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import zmq

from vla.config import ServeConfig, fast_config
from vla.policies import Policy, shipped_policy
from vla.serving import PolicyServer, load_authorized_keys, parse_bind


def serve(cfg: ServeConfig) -> int:
    """Loads the policy, warms it up, binds and serves until interrupted; 2 on a bad option."""
    try:
        parse_bind(cfg.bind)
        key = Path(cfg.curve_secret_key_file).read_text().strip().encode() if cfg.curve_secret_key_file else None
        allowed = load_authorized_keys(cfg.curve_authorized_keys) if cfg.curve_authorized_keys else None
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = cfg.policy or shipped_policy()
    policy = Policy.from_pretrained(path, fast=cfg.fast)
    policy.warmup()  # compile before the first client is told the server is up
    try:
        server = PolicyServer(policy, cfg.bind, curve_secret_key=key, authorized_keys=allowed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    clients = f"the {len(allowed)} clients of {cfg.curve_authorized_keys}" if allowed else "any client"
    print(f"serving {path} on {server.address} to {clients} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def cmd_serve(args) -> int:
    return serve(ServeConfig(policy=args.policy, bind=args.bind, fast=fast_config(args.fast),
                             threads=args.threads or 0, curve_secret_key_file=args.curve_secret_key_file,
                             curve_authorized_keys=args.curve_authorized_keys))


def cmd_keygen(args) -> int:
    """A CURVE key pair: NAME.key (public, for the other side) and NAME.key_secret (mode 0600)."""
    public, secret = zmq.curve_keypair()
    base = Path(args.name)
    base.parent.mkdir(parents=True, exist_ok=True)
    pub, sec = base.with_name(base.name + ".key"), base.with_name(base.name + ".key_secret")
    if (pub.exists() or sec.exists()) and not args.force:
        print(f"error: {pub} or {sec} exists (--force replaces them)", file=sys.stderr)
        return 2
    pub.write_text(public.decode() + "\n")
    fd = os.open(sec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.decode() + "\n")
    print(f"public key {pub}: {public.decode()}\nsecret key {sec} (keep it on this machine)")
    return 0


if __name__ == "__main__":  # the policy node's server process: a ServeConfig on stdin
    try:
        config = ServeConfig.from_json(sys.stdin.read())
    except ValueError as e:
        print(f"error: serve config on stdin: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(serve(config))
