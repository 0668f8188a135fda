"""The zmq policy server over a real loopback socket, serving the shipped policy: answers, errors as
replies for every malformed frame, and it keeps serving."""

import threading

import msgpack
import numpy as np
import pytest
import zmq

from vla.cli import shipped_policy
from vla.policies import Policy
from vla.ros_nodes.server import (PROTOCOL_VERSION, PolicyClient, PolicyServer, ServerError, encode, pack_array)


@pytest.fixture(scope="module")
def server():
    policy = Policy.from_pretrained(shipped_policy())
    srv = PolicyServer(policy, "tcp://127.0.0.1:*", max_bytes=1 << 20)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_ms": 20}, daemon=True)
    thread.start()
    yield srv
    srv.stop()
    thread.join(2)
    srv.close()


def observation(spec, size=None):
    s = size or spec["image_size"]
    rng = np.random.default_rng(0)
    obs = {f"observation.images.{c}": rng.integers(0, 255, (s, s, 3), dtype=np.uint8) for c in spec["cameras"]}
    obs["observation.state"] = np.zeros(spec["state_dim"], dtype=np.float32)
    obs["task"] = "press the red button"
    return obs


def raw_call(address, frame: bytes, timeout_ms=5000):
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.connect(address)
    try:
        sock.send(frame)
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close(0)


def test_client_gets_spec_actions_and_chunks(server):
    client = PolicyClient(server.address)
    assert client.spec == server.policy.spec
    client.reset(seed=3)
    obs = observation(client.spec)
    action = client.act(obs)
    assert action.shape == (client.spec["action_dim"],) and action.dtype == np.float32 and np.isfinite(action).all()
    chunk = client.act_chunk(obs)
    assert chunk.shape == (client.spec["horizon"], client.spec["action_dim"])
    client.close()


@pytest.mark.parametrize("frame,error", [
    (b"\xc1 not msgpack", "not a msgpack map"),
    (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
    (msgpack.packb({"v": 99, "cmd": "hello"}), "protocol version 99"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "cmd": "fly"}), "unknown cmd"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "cmd": "hello", "extra": 1}), "unknown keys"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "cmd": "act"}), "needs an 'obs' map"),
])
def test_malformed_frames_get_error_replies(server, frame, error):
    before = server.errors
    reply = raw_call(server.address, frame)
    assert reply["ok"] is False and error in reply["error"]
    assert server.errors == before + 1


def test_bad_arrays_and_observations_are_refused_and_the_server_keeps_serving(server):
    spec = server.policy.spec
    cam = f"observation.images.{spec['cameras'][0]}"
    cases = []
    obs = observation(spec)
    obs[cam] = {"__nd__": True, "dtype": "float16", "shape": [2], "data": b"\0" * 4}
    cases.append((obs, "dtype 'float16'"))
    obs = observation(spec)
    obs[cam] = {"__nd__": True, "dtype": "uint8", "shape": [96, 96, 3], "data": b"\0" * 10}
    cases.append((obs, "needs 27648 bytes"))
    cases.append((observation(spec, size=32), "must be uint8 96x96x3"))
    obs = observation(spec)
    obs["observation.state"] = np.full(spec["state_dim"], np.nan, dtype=np.float32)
    cases.append((obs, "non-finite"))
    obs = observation(spec)
    obs["observation.images.thermal"] = obs[cam]
    cases.append((obs, "unknown observation keys"))
    for obs, error in cases:
        frame = msgpack.packb({"v": PROTOCOL_VERSION, "cmd": "act", "obs": obs}, use_bin_type=True,
                              default=lambda a: pack_array(a))
        reply = raw_call(server.address, frame)
        assert reply["ok"] is False and error in reply["error"], reply
    # a frame over the limit is dropped by zmq before it is read: the client times out, nothing breaks
    big = encode({"v": PROTOCOL_VERSION, "cmd": "hello", "pad": b"\0" * (2 << 20)})
    with pytest.raises(zmq.Again):
        raw_call(server.address, big, timeout_ms=500)
    client = PolicyClient(server.address)
    assert client.act(observation(spec)).shape == (spec["action_dim"],)
    with pytest.raises(ServerError, match="must be uint8"):
        client.act(observation(spec, size=32))
    assert client.act(observation(spec)).shape == (spec["action_dim"],)  # the same client goes on
    client.close()


def test_binding_off_loopback_requires_curve_and_curve_works():
    policy = Policy.from_pretrained(shipped_policy())
    with pytest.raises(ValueError, match="requires CURVE"):
        PolicyServer(policy, "tcp://0.0.0.0:*")
    if not zmq.has("curve"):
        pytest.skip("libzmq without CURVE")
    public, secret = zmq.curve_keypair()
    srv = PolicyServer(policy, "tcp://127.0.0.1:*", curve_secret_key=secret)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_ms": 20}, daemon=True)
    thread.start()
    try:
        client = PolicyClient(srv.address, curve_server_key=public)
        assert client.spec["action_dim"] == policy.spec["action_dim"]
        client.close()
        with pytest.raises(TimeoutError):  # without the server's key the handshake never completes
            PolicyClient(srv.address, timeout_ms=500)
    finally:
        srv.stop()
        thread.join(2)
        srv.close()
