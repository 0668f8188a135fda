"""The zmq policy server and its client: request/reply, msgpack maps, arrays as dtype + shape + bytes.

Requests (maps with "v": PROTOCOL_VERSION and "cmd"):
  {"cmd": "hello"}                      -> {"ok": true, "spec": policy.spec}
  {"cmd": "reset", "seed": int?}        -> {"ok": true}
  {"cmd": "act" | "act_chunk", "obs": {key: array | str}} -> {"ok": true, "action": array, "infer_ms": float}
Every failure is a reply {"ok": false, "error": "..."}; the server keeps serving. Nothing is ever
unpickled: only msgpack maps, with arrays rebuilt from an allow-listed dtype, shape and raw bytes.
Loopback by default; binding any other address requires CURVE keys.
"""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import zmq

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024
DTYPES = {"uint8", "int32", "int64", "float32", "float64", "bool"}
COMMANDS = {"hello", "reset", "act", "act_chunk"}


class ProtocolError(ValueError):
    """A frame that does not follow the protocol."""


def pack_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"__nd__": True, "dtype": str(a.dtype), "shape": list(a.shape), "data": a.tobytes()}


def unpack_array(d: dict) -> np.ndarray:
    if set(d) != {"__nd__", "dtype", "shape", "data"}:
        raise ProtocolError(f"array map needs exactly dtype, shape, data; got {sorted(k for k in d if k != '__nd__')}")
    if d["dtype"] not in DTYPES:
        raise ProtocolError(f"array dtype {d['dtype']!r} is not one of {sorted(DTYPES)}")
    shape = d["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape) or len(shape) > 4:
        raise ProtocolError(f"array shape must be a list of at most 4 non-negative ints, got {shape!r}")
    data = d["data"]
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(d["dtype"]).itemsize
    if not isinstance(data, bytes) or len(data) != expected:
        raise ProtocolError(f"array of {d['dtype']} {shape} needs {expected} bytes, got "
                            f"{len(data) if isinstance(data, bytes) else type(data).__name__}")
    return np.frombuffer(data, dtype=d["dtype"]).reshape(shape).copy()  # writable, owns its memory


def encode(msg: dict) -> bytes:
    def default(o):
        if isinstance(o, np.ndarray):
            return pack_array(o)
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(f"cannot send {type(o).__name__}")

    return msgpack.packb(msg, default=default, use_bin_type=True)


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> dict:
    if len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the limit of {max_bytes}")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True,
                              object_hook=lambda d: unpack_array(d) if "__nd__" in d else d)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"not a msgpack map: {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"a frame must be a msgpack map, got {type(msg).__name__}")
    return msg


def _check_request(msg: dict, spec: dict) -> None:
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {msg.get('v')!r} is not supported (server speaks {PROTOCOL_VERSION})")
    if msg.get("cmd") not in COMMANDS:
        raise ProtocolError(f"unknown cmd {msg.get('cmd')!r}; known: {sorted(COMMANDS)}")
    unknown = set(msg) - {"v", "cmd", "obs", "seed"}
    if unknown:
        raise ProtocolError(f"unknown keys {sorted(unknown)}")
    if msg["cmd"] in ("act", "act_chunk"):
        obs = msg.get("obs")
        if not isinstance(obs, dict):
            raise ProtocolError("act needs an 'obs' map")
        allowed = {f"observation.images.{c}" for c in spec["cameras"]} | {"observation.state", "task"}
        extra = set(obs) - allowed
        if extra:
            raise ProtocolError(f"unknown observation keys {sorted(extra)}; expected {sorted(allowed)}")


class PolicyServer:
    """Serves one Policy on a zmq REP socket until `stop()`."""

    def __init__(self, policy, bind: str = "tcp://127.0.0.1:5555", curve_secret_key: bytes | None = None,
                 max_bytes: int = MAX_FRAME_BYTES):
        host = bind.split("://", 1)[-1].rsplit(":", 1)[0]
        loopback = host in ("127.0.0.1", "localhost", "[::1]", "::1") or bind.startswith(("ipc://", "inproc://"))
        if not loopback and curve_secret_key is None:
            raise ValueError(f"binding {bind} (not loopback) requires CURVE keys (curve_secret_key)")
        self.policy, self.max_bytes = policy, max_bytes
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)  # larger frames are dropped by zmq itself
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve_secret_key is not None:
            self.sock.curve_server = True
            self.sock.curve_secretkey = curve_secret_key
        self.sock.bind(bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.errors = 0
        self.served = 0
        self._running = False

    def handle(self, frame: bytes) -> dict:
        from vla.policies import ObservationError

        try:
            msg = decode(frame, self.max_bytes)
            _check_request(msg, self.policy.spec)
            cmd = msg["cmd"]
            if cmd == "hello":
                return {"ok": True, "v": PROTOCOL_VERSION, "spec": self.policy.spec}
            if cmd == "reset":
                self.policy.reset(msg.get("seed"))
                return {"ok": True}
            t0 = time.perf_counter()
            fn = self.policy.act if cmd == "act" else self.policy.act_chunk
            action = np.asarray(fn(msg["obs"]), dtype=np.float32)
            return {"ok": True, "action": action, "infer_ms": (time.perf_counter() - t0) * 1e3}
        except (ProtocolError, ObservationError) as e:
            self.errors += 1
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a bug or a model failure must not take the server down
            self.errors += 1
            return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}

    def serve_forever(self, poll_ms: int = 100) -> None:
        self._running = True
        while self._running:
            if not self.sock.poll(poll_ms):
                continue
            frame = self.sock.recv()
            self.sock.send(encode(self.handle(frame)))
            self.served += 1

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        self.sock.close(0)


class ServerError(RuntimeError):
    """The server answered with an error."""


class PolicyClient:
    """The Policy interface over the wire: reset / act / act_chunk / spec."""

    def __init__(self, address: str = "tcp://127.0.0.1:5555", timeout_ms: int = 5000,
                 curve_server_key: bytes | None = None):
        self.ctx = zmq.Context.instance()
        self.address, self.timeout_ms, self.curve_server_key = address, timeout_ms, curve_server_key
        self._lock = threading.Lock()  # a zmq socket is not thread-safe: one request at a time
        self._connect()
        reply = self._call({"cmd": "hello"})
        self.spec = reply["spec"]

    def _connect(self):
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        self.sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        if self.curve_server_key is not None:
            pub, sec = zmq.curve_keypair()
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = (
                self.curve_server_key, pub, sec)
        self.sock.connect(self.address)

    def _call(self, msg: dict) -> dict:
        with self._lock:
            return self._call_locked({"v": PROTOCOL_VERSION, **msg})

    def _call_locked(self, msg: dict) -> dict:
        try:
            self.sock.send(encode(msg))
            reply = decode(self.sock.recv())
        except zmq.Again:
            self.sock.close(0)
            self._connect()  # a REQ socket that missed its reply cannot send again
            raise TimeoutError(f"no reply from {self.address} within {self.timeout_ms} ms") from None
        if not reply.get("ok"):
            raise ServerError(reply.get("error", "unknown error"))
        return reply

    def reset(self, seed: int | None = None) -> None:
        self._call({"cmd": "reset", "seed": seed})

    def act(self, obs: dict) -> np.ndarray:
        return self._call({"cmd": "act", "obs": obs})["action"]

    def act_chunk(self, obs: dict) -> np.ndarray:
        return self._call({"cmd": "act_chunk", "obs": obs})["action"]

    def close(self) -> None:
        self.sock.close(0)
