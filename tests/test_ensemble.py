"""Action selection around any chunk source: a Policy, a PolicyClient over a real socket, a custom one."""

import threading

import numpy as np
import pytest

from vla.policies import Policy, shipped_policy
from vla.policies.ensemble import AdaptiveEnsemble, ChunkQueue, TemporalEnsemble, make_selector
from vla.serving import PolicyClient, PolicyServer
from vla.spec import PolicySpec

SPEC = PolicySpec(cameras=("front",), image_size=8, state_dim=2, action_dim=2, horizon=4, n_action_steps=2, fps=10)


class Counting:
    """A custom chunk source: chunk k is all k's, so which chunk an action came from shows."""

    spec = SPEC

    def __init__(self):
        self.calls, self.resets = 0, 0

    def reset(self, seed=None):
        self.resets += 1

    def act_chunk(self, obs):
        self.calls += 1
        return np.full((4, 2), float(self.calls)) + np.arange(4)[:, None] * 0.1


def test_the_queue_plays_n_action_steps_then_replans_and_reports_its_timing():
    q = ChunkQueue(Counting())
    a = [q.act({}) for _ in range(5)]
    assert [x[0] for x in a] == pytest.approx([1.0, 1.1, 2.0, 2.1, 3.0])
    q.act({})
    assert q.last_infer_ms is None and q.source.calls == 3  # served from the queue
    q.reset(3)
    q.act({})
    assert q.last_infer_ms is not None and q.source.calls == 4 and q.source.resets == 1


def test_temporal_and_adaptive_weigh_every_chunks_prediction_for_now():
    t = TemporalEnsemble(Counting(), k=0.0)  # equal weights: the mean of what each chunk says for now
    t.act({})
    second = t.act({})  # chunk 1 row 1 (1.1) and chunk 2 row 0 (2.0)
    assert second[0] == pytest.approx((1.1 + 2.0) / 2) and t.last_infer_ms is not None
    a = AdaptiveEnsemble(Counting(), alpha=0.0)
    a.act({})
    assert a.act({})[0] == pytest.approx((1.1 + 2.0) / 2)
    with pytest.raises(ValueError, match="ensemble must be one of"):
        make_selector("vote", Counting())


def test_a_queue_around_a_policy_client_equals_the_policy_s_own_queue():
    policy = Policy.from_pretrained(shipped_policy())
    srv = PolicyServer(policy, "tcp://127.0.0.1:*")
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_ms": 20}, daemon=True)
    thread.start()
    try:
        spec = policy.spec
        rng = np.random.default_rng(0)
        obs = {f"observation.images.{c}": rng.integers(0, 255, (spec.image_size,) * 2 + (3,), dtype=np.uint8)
               for c in spec.cameras}
        obs.update({"observation.state": np.zeros(spec.state_dim, np.float32), "task": "press the red button"})
        remote = ChunkQueue(PolicyClient(srv.address, timeout_ms=30000))
        remote.reset(0)
        local = policy.fork()
        local.reset(0)
        served = srv.served
        got = [remote.act(obs) for _ in range(spec.n_action_steps + 1)]
        want = [local.act(obs) for _ in range(spec.n_action_steps + 1)]
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)
        assert srv.served - served == 2  # one chunk per n_action_steps: the queue saved the round trips
        assert local.last_infer_ms is not None and remote.last_infer_ms is not None
        remote.source.close()
    finally:
        srv.stop()
        thread.join(2)
        srv.close()
