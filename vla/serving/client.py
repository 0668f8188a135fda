"""The client of `vla serve`: the Policy interface (reset / act / act_chunk / spec) over the wire.

It needs only zmq, msgpack and numpy (no torch): a robot's computer runs it against a GPU server.
"""

from __future__ import annotations

import threading

import numpy as np
import zmq

from vla.serving.protocol import PROTOCOL_VERSION, decode, encode
from vla.spec import PolicySpec, SpecError


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
        try:
            self.spec = PolicySpec.from_dict(reply.get("spec"))
        except SpecError as e:
            raise ServerError(f"{address} sent no valid spec: {e}") from None

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
