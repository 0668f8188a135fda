"""A seeded fuzzer for `vla serve`: every category of hostile or broken input, then a well-behaved
client, counting crashes, lost replies and the server's memory.

    .venv/bin/python scripts/fuzz_server.py --frames 10000            # starts `vla serve` itself
    .venv/bin/python scripts/fuzz_server.py --address tcp://127.0.0.1:5555 --frames 500

Categories (each `--frames` messages):
  bytes      random bytes as one frame
  mutated    valid requests with flipped bits, truncated or extended
  msgpack    random msgpack values (any type, nesting, sizes)
  protocol   protocol-shaped maps with wrong values (versions, commands, seeds, arrays, tasks, states)
  multipart  messages of 2-5000 parts, delimiters in odd places (REQ and DEALER peers)
  tcp        raw TCP peers: random bytes, ZMTP-looking greetings, then close
Every message of a zmq category must get a reply (an error map); a well-behaved client's request
after each batch must get its actions. tests/test_fuzz.py runs this with few frames.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import msgpack
import numpy as np
import zmq

from vla.ros_nodes.run import rss_mb
from vla.serving import PolicyClient
from vla.serving.protocol import PROTOCOL_VERSION, encode

CATEGORIES = ["bytes", "mutated", "msgpack", "protocol", "multipart", "tcp"]


def _valid(spec, rng) -> dict:
    s = spec.image_size
    obs = {f"observation.images.{c}": rng.integers(0, 255, (s, s, 3), dtype=np.uint8) for c in spec.cameras}
    obs["observation.state"] = rng.normal(0, 0.2, spec.state_dim).astype(np.float32)
    obs["task"] = str(rng.choice(["press the red button", "open the drawer", "pick up the blue cube"]))
    return {"v": PROTOCOL_VERSION, "cmd": str(rng.choice(["act", "act_chunk"])), "obs": obs}


def _random_value(rng, depth=0):
    kind = int(rng.integers(0, 10 if depth < 4 else 6))
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(2))
    if kind == 2:
        return int(rng.choice([0, 1, -1, 2 ** 63 - 1, -(2 ** 63), 2 ** 64 - 1, int(rng.integers(-1e9, 1e9))]))
    if kind == 3:
        return float(rng.choice([0.0, 1.0, np.nan, np.inf, -np.inf, 3.4e38, 1e308, rng.normal()]))
    if kind == 4:
        return "".join(chr(int(c)) for c in rng.integers(1, 0x2FF, int(rng.integers(0, 40))))
    if kind == 5:
        return rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
    if kind in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 6)))]
    keys = ["v", "cmd", "obs", "seed", "__nd__", "dtype", "shape", "data", "task", "observation.state"]
    return {str(rng.choice(keys)) if rng.random() < 0.7 else _random_value(rng, 9): _random_value(rng, depth + 1)
            for _ in range(int(rng.integers(0, 6)))}


def _protocol(spec, rng) -> dict:
    msg = _valid(spec, rng)
    cam = f"observation.images.{spec.cameras[0]}"
    case = int(rng.integers(0, 14))
    if case == 0:
        msg["v"] = _random_value(rng)
    elif case == 1:
        msg["cmd"] = _random_value(rng)
    elif case == 2:
        msg = {"v": PROTOCOL_VERSION, "cmd": "reset", "seed": _random_value(rng)}
    elif case == 3:
        msg["obs"][cam] = {"__nd__": True, "dtype": str(rng.choice(["uint8", "float16", "object", "V8", "<U4"])),
                           "shape": [int(x) for x in rng.integers(-2, 2 ** 31, int(rng.integers(0, 6)))],
                           "data": rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()}
    elif case == 4:
        msg["obs"][cam] = {"__nd__": True, "dtype": "float64", "shape": [2 ** 40] * 4, "data": b"\0" * 8}
    elif case == 5:
        msg["obs"]["task"] = str(rng.choice(["", " ", "\t\n", "\x00", "x" * int(rng.integers(900, 5000))]))
    elif case == 6:
        msg["obs"]["observation.state"] = np.full(spec.state_dim, rng.choice([3.4e38, -3.4e38, 1e38, 1e30, np.nan, np.inf]),
                                                  np.float32)
    elif case == 7:
        msg["obs"]["observation.state"] = _random_value(rng)
    elif case == 8:
        del msg["obs"][str(rng.choice(list(msg["obs"])))]
    elif case == 9:
        msg["obs"][f"observation.images.{_random_value(rng, 9)}"] = msg["obs"][cam]
    elif case == 10:
        msg["obs"][cam] = rng.integers(0, 255, (int(rng.integers(1, 200)),) * 2 + (3,), dtype=np.uint8)
    elif case == 11:
        msg["obs"][cam] = msg["obs"][cam].astype(np.float32)
    elif case == 12:
        msg[str(_random_value(rng, 9))] = _random_value(rng)
    else:
        msg["obs"] = _random_value(rng)
    return msg


def frames(category: str, spec, rng) -> list[bytes]:
    """One message (its parts) of a zmq category."""
    if category == "bytes":
        return [rng.integers(0, 256, int(rng.choice([0, 1, 5, 100, 4096, 65536])), dtype=np.uint8).tobytes()]
    if category == "mutated":
        b = bytearray(encode(_valid(spec, rng)))
        op = int(rng.integers(3))
        if op == 0:
            for i in rng.integers(0, len(b), int(rng.integers(1, 20))):
                b[i] ^= 1 << int(rng.integers(8))
        elif op == 1:
            b = b[: int(rng.integers(0, len(b)))]
        else:
            b += rng.integers(0, 256, int(rng.integers(1, 100)), dtype=np.uint8).tobytes()
        return [bytes(b)]
    try:
        if category == "msgpack":
            return [msgpack.packb(_random_value(rng), use_bin_type=True)]
        if category == "protocol":
            return [encode(_protocol(spec, rng))]
    except (TypeError, ValueError, OverflowError):  # a value msgpack cannot write
        return [msgpack.packb({"v": 1, "cmd": "act", "obs": {}})]
    if category == "multipart":
        body = encode(_valid(spec, rng))
        n = int(rng.choice([2, 3, 5, 50, 5000]))
        parts = [body if rng.random() < 0.5 else b"" for _ in range(n)]
        parts[0] = body
        return parts
    raise ValueError(category)


def _tcp_garbage(port: int, rng) -> None:
    payload = rng.integers(0, 256, int(rng.choice([1, 10, 64, 1024, 65536])), dtype=np.uint8).tobytes()
    prefix = [b"", b"\x01\x00", b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00NULL" + b"\x00" * 48][int(rng.integers(3))]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(prefix + payload)
    except OSError:  # the server may drop us mid-send: that is its right
        pass


def fuzz(address: str, n: int, seed: int = 0, categories=CATEGORIES, check_every: int = 50,
         timeout_ms: int = 5000, progress: bool = False) -> dict:
    """Sends n messages of each category; returns per category: sent, replies, lost, and the
    well-behaved client's checks and failures."""
    rng = np.random.default_rng(seed)
    ctx = zmq.Context.instance()
    client = PolicyClient(address, timeout_ms=timeout_ms)
    spec = client.spec
    port = int(address.rsplit(":", 1)[1]) if address.startswith("tcp://") else None
    result = {}
    for category in categories:
        row = {"sent": 0, "replies": 0, "lost": 0, "client_checks": 0, "client_failures": 0}
        kind = zmq.DEALER
        sock = None
        for i in range(n):
            if category == "tcp":
                if port is not None:
                    _tcp_garbage(port, rng)
                    row["sent"] += 1
            else:
                if sock is None or i % 100 == 0:  # a new peer now and then; REQ peers for multipart
                    if sock is not None:
                        sock.close(0)
                    kind = zmq.REQ if category == "multipart" and rng.random() < 0.5 else zmq.DEALER
                    sock = ctx.socket(kind)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
                    sock.connect(address)
                parts = frames(category, spec, rng)
                if kind == zmq.DEALER and rng.random() < 0.5:
                    parts = [b""] + parts  # REQ-style envelope
                sock.send_multipart(parts)
                row["sent"] += 1
                try:
                    sock.recv_multipart()
                    row["replies"] += 1
                except zmq.Again:
                    row["lost"] += 1
                    sock.close(0)
                    sock = None
            if (i + 1) % check_every == 0:
                row["client_checks"] += 1
                try:
                    client.act_chunk(_valid(spec, rng)["obs"])
                except Exception:  # noqa: BLE001 - any failure of a well-behaved request counts
                    row["client_failures"] += 1
            if progress and (i + 1) % 1000 == 0:
                print(f"  {category}: {i + 1}/{n}", file=sys.stderr, flush=True)
        if sock is not None:
            sock.close(0)
        result[category] = row
    client.close()
    return result


def big_frames(address: str, pid: int | None, n: int = 24, size: int = 16 * 1024 * 1024 - 1024) -> dict:
    """One 16 MiB task (once read whole by the tokenizer: 13-17 s), then n pipelined frames of
    `size` bytes from one peer (once ~650 MB more): reply time, and the server's memory."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 60000)
    sock.connect(address)
    out = {}
    t0 = time.perf_counter()
    sock.send_multipart([b"", encode({"v": PROTOCOL_VERSION, "cmd": "act", "obs": {"task": "x" * (16 * 2 ** 20 - 1024)}})])
    reply = msgpack.unpackb(sock.recv_multipart()[-1])
    out["task_16mib_reply_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    out["task_16mib_error"] = reply.get("error", "")[:80]
    before = rss_mb(pid) if pid else None
    peak = before
    if peak is None:  # no process to read (a server started elsewhere)
        pid = None
    pad = encode({"v": PROTOCOL_VERSION, "cmd": "hello", "pad": b"\0" * (size - 64)})
    for _ in range(n):
        sock.send_multipart([b"", pad], copy=False)
    answered = 0
    for _ in range(n):
        try:
            sock.recv_multipart()
            answered += 1
        except zmq.Again:
            break
        if pid:
            peak = max(peak, rss_mb(pid) or peak)
    sock.close(0)
    out.update(pipelined_frames=n, pipelined_answered=answered,
               server_rss_mb_before=before and round(before, 1), server_rss_mb_peak=peak and round(peak, 1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=10000, help="messages per category")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--address", default=None, help="a running server (default: start `vla serve` here)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    proc = None
    address = args.address
    if address is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        address = f"tcp://127.0.0.1:{port}"
        log = open(os.path.join(tempfile.gettempdir(), "vla-fuzz-server.log"), "w")
        proc = subprocess.Popen([sys.executable, "-m", "vla.cli", "serve", "--bind", address, "--threads", "1"],
                                stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while True:
            try:
                PolicyClient(address, timeout_ms=1000).close()
                break
            except TimeoutError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print(f"error: the server did not start (see {log.name})", file=sys.stderr)
                    return 1
    rss0 = rss_mb(proc.pid) if proc else None
    t0 = time.monotonic()
    result = fuzz(address, args.frames, args.seed, progress=True)
    wall = time.monotonic() - t0
    big = big_frames(address, proc.pid if proc else None) if proc is None or proc.poll() is None else {}
    out = {"frames_per_category": args.frames, "categories": result, "wall_s": round(wall, 1),
           "frames_sent": sum(r["sent"] for r in result.values()),
           "replies_lost": sum(r["lost"] for r in result.values()),
           "client_failures": sum(r["client_failures"] for r in result.values()), "big_frames": big}
    if proc is not None:
        out["server_alive"] = proc.poll() is None
        out["crashes"] = 0 if out["server_alive"] else 1
        out["server_rss_mb_start"], out["server_rss_mb_end"] = rss0, rss_mb(proc.pid)
        proc.terminate()
        proc.wait(10)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    bad = out["replies_lost"] or out["client_failures"] or out.get("crashes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
