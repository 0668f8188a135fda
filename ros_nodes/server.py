"""The zmq policy server and its client: request/reply, msgpack maps, arrays as dtype + shape + bytes.

Requests (maps with "v": PROTOCOL_VERSION and "cmd"):
  {"cmd": "hello"}                      -> {"ok": true, "spec": policy.spec}
  {"cmd": "reset", "seed": int?}        -> {"ok": true}
  {"cmd": "act" | "act_chunk", "obs": {key: array | str}} -> {"ok": true, "action": array, "infer_ms": float}
Every failure is a reply {"ok": false, "error": "..."}; the server keeps serving. Nothing is ever
unpickled: only msgpack maps, with arrays rebuilt from an allow-listed dtype, shape and raw bytes.

The server is a ROUTER socket: it reads each message whole (every part), answers a malformed one
with an error reply on the same route, and never sends in a state where sending can fail, so no
peer (a REQ or DEALER client, a ZMTP 1.0 peer, raw TCP garbage) can stop it or take another
client's reply. Each connection (its zmq routing identity) has its own session: its own action
queue, ensembling history and noise generator; the real-time engine's caches are reset whenever
another session uses it. Sessions are bounded in number and expire when idle.

Loopback by default; binding any other address requires CURVE keys (the server is authenticated
and traffic encrypted). With `authorized_keys`, only clients whose CURVE public key is listed
are served (ZAP); without it, any client that knows the server's public key is.
"""

from __future__ import annotations

import ipaddress
import math
import re
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import msgpack
import numpy as np
import zmq

from vla.errors import ObservationError, brief

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_PARTS = 8  # parts of one message kept; the rest are read and dropped
MAX_ERROR_CHARS = 400  # an error reply never echoes more of what a client sent
PEER_HWM = 4  # messages queued per peer (zmq high-water marks): bounds memory per connection
DTYPES = {"uint8", "int32", "int64", "float32", "float64", "bool"}
COMMANDS = {"hello", "reset", "act", "act_chunk"}
Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


class ProtocolError(ValueError):
    """A frame that does not follow the protocol."""


def pack_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"__nd__": True, "dtype": str(a.dtype), "shape": list(a.shape), "data": a.tobytes()}


def unpack_array(d: dict) -> np.ndarray:
    if set(d) != {"__nd__", "dtype", "shape", "data"}:
        raise ProtocolError(f"array map needs exactly dtype, shape, data; got {brief(sorted(map(str, d)))}")
    if not isinstance(d["dtype"], str) or d["dtype"] not in DTYPES:
        raise ProtocolError(f"array dtype {brief(d['dtype'])} is not one of {sorted(DTYPES)}")
    shape = d["shape"]
    if (not isinstance(shape, list) or len(shape) > 4
            or not all(type(s) is int and s >= 0 for s in shape)):
        raise ProtocolError(f"array shape must be a list of at most 4 non-negative ints, got {brief(shape)}")
    data = d["data"]
    expected = math.prod(shape) * np.dtype(d["dtype"]).itemsize  # Python ints: no overflow
    if not isinstance(data, bytes) or len(data) != expected:
        raise ProtocolError(f"array of {d['dtype']} {brief(shape)} needs {expected} bytes, got "
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
    try:  # the limits refuse a long string or list before it is built (a task is at most 1000 chars)
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_str_len=16384, max_array_len=4096,
                              max_map_len=64, max_ext_len=0, max_bin_len=max_bytes,
                              object_hook=lambda d: unpack_array(d) if "__nd__" in d else d)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"not a msgpack map: {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"a frame must be a msgpack map, got {type(msg).__name__}")
    return msg


def _check_request(msg: dict, spec: dict) -> None:
    v = msg.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:  # not 1.0, not True
        raise ProtocolError(f"protocol version {brief(v)} is not supported (server speaks {PROTOCOL_VERSION})")
    cmd = msg.get("cmd")
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise ProtocolError(f"unknown cmd {brief(cmd)}; known: {sorted(COMMANDS)}")
    unknown = set(msg) - {"v", "cmd", "obs", "seed"}
    if unknown:
        raise ProtocolError(f"unknown keys {brief(sorted(map(str, unknown)))}")
    seed = msg.get("seed")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 2 ** 63):
        raise ProtocolError(f"seed must be an int in [0, 2**63) or absent, got {brief(seed)}")
    if cmd in ("act", "act_chunk"):
        obs = msg.get("obs")
        if not isinstance(obs, dict):
            raise ProtocolError("act needs an 'obs' map")
        allowed = {f"observation.images.{c}" for c in spec["cameras"]} | {"observation.state", "task"}
        extra = set(obs) - allowed
        if extra:
            raise ProtocolError(f"unknown observation keys {brief(sorted(map(str, extra)))}; expected {sorted(allowed)}")
        for key, value in obs.items():
            if key == "task" and not isinstance(value, str):
                raise ProtocolError(f"task must be a string, got {type(value).__name__}")
            if key.startswith("observation.images.") and not isinstance(value, np.ndarray):
                raise ProtocolError(f"{key} must be an array map, got {type(value).__name__}")


def parse_bind(bind: str) -> tuple[str, bool, bool]:
    """An endpoint -> (host, is_loopback, is_ipv6). tcp://127.0.0.1:5555, tcp://[::1]:5555, ipc://..."""
    scheme, sep, rest = bind.partition("://")
    if not sep:
        raise ValueError(f"bind address {bind!r} needs a transport, e.g. tcp://127.0.0.1:5555 or ipc:///tmp/vla")
    if scheme in ("ipc", "inproc"):
        return rest, True, False
    if scheme != "tcp":
        raise ValueError(f"bind address {bind!r}: transport {scheme!r} is not tcp, ipc or inproc")
    host, _, port = rest.rpartition(":")
    if not host or not port:
        raise ValueError(f"bind address {bind!r} needs host:port (port * for any)")
    ipv6 = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if ipv6 else host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return host, loopback, ipv6


def load_authorized_keys(path: str | Path) -> set[bytes]:
    """One Z85 CURVE public key (40 characters) per line, optionally followed by a space and a name;
    lines starting with '#' are comments ('#' is itself a Z85 character)."""
    keys = set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        line = line.split()[0]
        if not Z85_KEY.match(line):
            raise ValueError(f"{path}:{n}: not a Z85 CURVE public key (40 characters): {line[:60]!r}")
        keys.add(line.encode())
    if not keys:
        raise ValueError(f"{path}: no keys (an empty allow-list would refuse every client)")
    return keys


class _AllowList:
    """pyzmq's ZAP callback: a client is served when its public key is in the list."""

    def __init__(self, keys: set[bytes]):
        self.keys = keys
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys
        self.refused += not ok
        return ok


class PolicyServer:
    """Serves one Policy on a zmq ROUTER socket until `stop()`; one session per connection."""

    def __init__(self, policy, bind: str = "tcp://127.0.0.1:5555", curve_secret_key: bytes | None = None,
                 authorized_keys: set[bytes] | None = None, max_bytes: int = MAX_FRAME_BYTES,
                 max_sessions: int = 32, session_idle_s: float = 120.0):
        _, loopback, ipv6 = parse_bind(bind)
        if not loopback and curve_secret_key is None:
            raise ValueError(f"binding {bind} (not loopback) requires CURVE keys (curve_secret_key)")
        if authorized_keys is not None and curve_secret_key is None:
            raise ValueError("a client allow-list (authorized_keys) needs CURVE keys (curve_secret_key)")
        self.policy, self.max_bytes = policy, max_bytes
        self.max_sessions, self.session_idle_s = max_sessions, session_idle_s
        self.sessions: OrderedDict[bytes, tuple[object, float]] = OrderedDict()  # identity -> (policy, last use)
        self.ctx = zmq.Context()  # its own: a ZAP handler applies to every socket of a context
        self.auth = None
        if authorized_keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self.allow = _AllowList(set(authorized_keys))
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve_callback("*", credentials_provider=self.allow)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)  # a larger part disconnects its peer
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, PEER_HWM)
        self.sock.setsockopt(zmq.SNDHWM, PEER_HWM)
        self.sock.setsockopt(zmq.IPV6, int(ipv6))
        self.sock.setsockopt(zmq.HANDSHAKE_IVL, 3000)  # a peer that connects and says nothing holds a socket 3 s, not 30
        if curve_secret_key is not None:
            self.sock.curve_server = True
            self.sock.curve_secretkey = curve_secret_key
        try:
            self.sock.bind(bind)
        except zmq.ZMQError as e:
            self.close()
            raise ValueError(f"cannot bind {bind}: {e}") from None
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.errors = 0
        self.served = 0
        self.dropped_replies = 0  # replies whose peer had gone or stopped reading
        self.evicted = 0  # sessions dropped to make room for a new connection
        self.internal_errors = 0  # exceptions outside a request's handling (bugs), survived
        self._running = False

    # --- sessions ---
    def _session(self, identity: bytes):
        """This connection's policy. Sessions idle longer than session_idle_s expire; when
        max_sessions are held, the least recently used one makes room (a client that reconnects
        has a new identity: its old session is never used again)."""
        now = time.monotonic()
        for key, (_, last) in list(self.sessions.items()):  # oldest use first
            if now - last <= self.session_idle_s:
                break
            del self.sessions[key]
        if identity in self.sessions:
            policy = self.sessions.pop(identity)[0]
        else:
            if len(self.sessions) >= self.max_sessions:
                self.sessions.popitem(last=False)
                self.evicted += 1
            policy = self.policy.fork()
        self.sessions[identity] = (policy, now)
        return policy

    # --- requests ---
    def handle(self, frame: bytes, identity: bytes = b"") -> dict:
        """One request frame -> its reply map (never raises)."""
        try:
            msg = decode(frame, self.max_bytes)
            _check_request(msg, self.policy.spec)
            cmd = msg["cmd"]
            if cmd == "hello":
                return {"ok": True, "v": PROTOCOL_VERSION, "spec": self.policy.spec}
            policy = self._session(identity)
            if cmd == "reset":
                policy.reset(msg.get("seed"))
                return {"ok": True}
            t0 = time.perf_counter()
            fn = policy.act if cmd == "act" else policy.act_chunk
            action = np.asarray(fn(msg["obs"]), dtype=np.float32)
            return {"ok": True, "action": action, "infer_ms": (time.perf_counter() - t0) * 1e3}
        except (ProtocolError, ObservationError) as e:
            return self._error(str(e))
        except Exception as e:  # a bug or a model failure must not take the server down
            return self._error(f"internal error: {type(e).__name__}: {e}")

    def _error(self, text: str) -> dict:
        self.errors += 1
        return {"ok": False, "error": text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."}

    def _receive(self) -> tuple[list[bytes], list[bytes], int]:
        """One whole message -> (its route back, the request parts kept, how many parts it had).
        A REQ peer's message is [identity, (hops...), b"", request]; a DEALER's may lack the delimiter."""
        parts, count = [], 0
        while True:
            part = self.sock.recv(copy=False)
            count += 1
            if len(parts) < MAX_PARTS:
                parts.append(part.bytes)
            if not part.more:
                break
        split = 1
        if b"" in parts[1:]:  # routing frames are zmq identities (at most 255 bytes), then the delimiter
            k = parts.index(b"", 1)
            if all(len(p) <= 255 for p in parts[1:k]):
                split = k + 1
        return parts[:split], parts[split:], count - split

    def _send(self, route: list[bytes], reply: dict) -> None:
        try:
            self.sock.send_multipart(route + [encode(reply)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # the peer's queue is full or it has gone: its reply is dropped, nobody else's
            self.dropped_replies += 1

    def poll_once(self, timeout_ms: int = 100) -> bool:
        """Serve at most one message; False when none arrived within the timeout."""
        if not self.sock.poll(timeout_ms):
            return False
        route, body, n_parts = self._receive()
        if len(route) + n_parts > MAX_PARTS:  # the parts past MAX_PARTS were not kept
            reply = self._error(f"a message of {len(route) + n_parts} parts; at most {MAX_PARTS} (routing "
                                "envelope and one request frame)")
        elif n_parts == 1:
            reply = self.handle(body[0], route[0])
        else:
            reply = self._error(f"a request is one msgpack frame after the routing envelope; got {n_parts} parts")
        self._send(route, reply)
        self.served += 1
        return True

    def serve_forever(self, poll_ms: int = 100) -> None:
        self._running = True
        while self._running:
            try:
                self.poll_once(poll_ms)
            except Exception as e:  # a bug here must not stop the server: count it, say it, go on
                self.internal_errors += 1
                print(f"vla serve: internal error ({type(e).__name__}: {e}); still serving", file=sys.stderr,
                      flush=True)

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


class ServerError(RuntimeError):
    """The server answered with an error."""


class PolicyClient:
    """The Policy interface over the wire: reset / act / act_chunk / spec.

    curve_server_key: the server's Z85 public key (a server off loopback needs it);
    curve_secret_key: this client's Z85 secret key, for a server with an allow-list (default: a
    fresh key pair, which such a server refuses)."""

    def __init__(self, address: str = "tcp://127.0.0.1:5555", timeout_ms: int = 5000,
                 curve_server_key: bytes | None = None, curve_secret_key: bytes | None = None):
        self.ctx = zmq.Context.instance()
        self.address, self.timeout_ms = address, timeout_ms
        self.curve_server_key, self.curve_secret_key = curve_server_key, curve_secret_key
        self._lock = threading.Lock()  # a zmq socket is not thread-safe: one request at a time
        self._connect()
        reply = self._call({"cmd": "hello"})
        self.spec = reply["spec"]

    def _connect(self):
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        self.sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        self.sock.setsockopt(zmq.IPV6, 1)
        if self.curve_server_key is not None:
            sec = self.curve_secret_key
            pub, sec = (zmq.curve_public(sec), sec) if sec is not None else zmq.curve_keypair()
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
