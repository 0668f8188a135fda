"""The zmq policy server (`vla serve`): one Policy behind a ROUTER socket.

It reads each message whole (every part), answers a malformed one with an error reply on the same
route, and never sends in a state where sending can fail, so no peer (a REQ or DEALER client, a
ZMTP 1.0 peer, raw TCP garbage) can stop it or take another client's reply. Each connection (its
zmq routing identity) has its own session: its own action queue, ensembling history and noise
generator; the real-time engine's caches are reset whenever another session uses it. Sessions are
bounded in number and expire when idle.

Loopback by default; binding any other address requires CURVE keys (the server is authenticated
and traffic encrypted). With `authorized_keys`, only clients whose CURVE public key is listed
are served (ZAP); without it, any client that knows the server's public key is.
"""

from __future__ import annotations

import ipaddress
import re
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from vla.errors import ObservationError
from vla.serving.protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION, ProtocolError, check_request, decode, encode

MAX_PARTS = 8  # parts of one message kept; the rest are read and dropped
MAX_ERROR_CHARS = 400  # an error reply never echoes more of what a client sent
PEER_HWM = 4  # messages queued per peer (zmq high-water marks): bounds memory per connection
Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


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
            check_request(msg, self.policy.spec)
            cmd = msg["cmd"]
            if cmd == "hello":
                return {"ok": True, "v": PROTOCOL_VERSION, "spec": self.policy.spec.to_dict()}
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
        self.served += 1  # before the reply leaves: a client that has its reply sees it counted
        self._send(route, reply)
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
