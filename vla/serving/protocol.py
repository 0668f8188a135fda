"""The wire format of `vla serve`: msgpack maps, arrays as dtype + shape + bytes, a version field.

Requests (maps with "v": PROTOCOL_VERSION and "cmd"):
  {"cmd": "hello"}                      -> {"ok": true, "spec": policy.spec}
  {"cmd": "reset", "seed": int?}        -> {"ok": true}
  {"cmd": "act" | "act_chunk", "obs": {key: array | str}} -> {"ok": true, "action": array, "infer_ms": float}
Every failure is a reply {"ok": false, "error": "..."}. Nothing is ever unpickled: only msgpack
maps, with arrays rebuilt from an allow-listed dtype, shape and raw bytes.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np

from vla.errors import brief
from vla.spec import PolicySpec

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


def check_request(msg: dict, spec: PolicySpec) -> None:
    """A decoded request against the protocol and the policy's spec; raises ProtocolError."""
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
        allowed = spec.observation_keys()
        extra = set(obs) - allowed
        if extra:
            raise ProtocolError(f"unknown observation keys {brief(sorted(map(str, extra)))}; expected {sorted(allowed)}")
        for key, value in obs.items():
            if key == "task" and not isinstance(value, str):
                raise ProtocolError(f"task must be a string, got {type(value).__name__}")
            if key.startswith("observation.images.") and not isinstance(value, np.ndarray):
                raise ProtocolError(f"{key} must be an array map, got {type(value).__name__}")
