"""Input a policy must refuse and output it must never give, on the plain and the real-time path:
these guards sit in the Policy itself, so the server, the ROS2 node and eval are all covered."""

import numpy as np
import pytest
import torch

from vla.config import FastConfig
from vla.policies import ObservationError, Policy, shipped_policy
from vla.policies.policy import MAX_TASK_CHARS


@pytest.fixture(scope="module", params=["plain", "fast"])
def policy(request):
    return Policy.from_pretrained(shipped_policy(), fast=FastConfig() if request.param == "fast" else None)


def observation(spec, task="press the red button", state=None):
    rng = np.random.default_rng(0)
    obs = {f"observation.images.{c}": rng.integers(0, 255, (spec.image_size,) * 2 + (3,), dtype=np.uint8)
           for c in spec.cameras}
    obs["observation.state"] = np.zeros(spec.state_dim, np.float32) if state is None else state
    obs["task"] = task
    return obs


def reference_chunk(obs):
    return Policy.from_pretrained(shipped_policy()).act_chunk(obs)


@pytest.mark.parametrize("task,error", [("", "is empty"), ("  \t\n ", "is empty"),
                                        ("x" * (MAX_TASK_CHARS + 1), f"the limit is {MAX_TASK_CHARS}")])
def test_empty_blank_and_huge_tasks_are_refused_and_poison_nothing(policy, task, error):
    """An empty task once tokenized to zero tokens: every text row of the fast path's prefix was
    masked, softmax over -inf gave NaN, and the NaN stayed in the caches for every later request."""
    obs = observation(policy.spec)
    policy.reset(0)
    expected = reference_chunk(obs)
    with pytest.raises(ObservationError, match=error):
        policy.act_chunk(dict(obs, task=task))
    policy.reset(0)
    np.testing.assert_allclose(policy.act_chunk(obs), expected, atol=1e-5)


@pytest.mark.parametrize("value", [3.4e38, -3.4e38, 1e38, 1e30, 1e9])
def test_extreme_finite_states_are_refused_not_answered_with_nan(policy, value):
    obs = observation(policy.spec)
    policy.reset(0)
    expected = reference_chunk(obs)
    extreme = observation(policy.spec, state=np.full(policy.spec.state_dim, value, np.float32))
    with pytest.raises(ObservationError, match="standard deviations from the training data"):
        policy.act(extreme)
    assert not policy.selector.queue  # nothing queued from the refused call
    policy.reset(0)
    np.testing.assert_allclose(policy.act_chunk(obs), expected, atol=1e-5)


def test_non_finite_model_output_is_refused_and_the_caches_dropped(policy):
    """A fault injected on purpose: the head's output bias set to NaN. The policy must refuse to
    hand the chunk out (nothing queued) and, once the model is whole again, answer as a fresh one."""
    obs = observation(policy.spec)
    policy.reset(0)
    expected = reference_chunk(obs)
    bias = policy.model.head.out.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[0] = float("nan")
    try:
        with pytest.raises(ObservationError, match="non-finite actions"):
            policy.act(obs)
        assert not policy.selector.queue
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    policy.reset(0)
    np.testing.assert_allclose(policy.act_chunk(obs), expected, atol=1e-5)


def test_the_fast_engine_refuses_an_instruction_without_tokens_and_reset_clears_its_caches():
    policy = Policy.from_pretrained(shipped_policy(), fast=FastConfig())
    engine = policy.engine
    with pytest.raises(ValueError, match="has no tokens"):
        engine.set_instruction("")
    obs = observation(policy.spec)
    policy.act_chunk(obs)
    slot = engine.lm_layers[0].self_attn.vla_slot
    slot.v.fill_(float("nan"))  # whatever an earlier call left behind
    engine.head_kv[0][1].fill_(float("nan"))
    policy.reset(0)
    assert engine.instruction is None and not slot.v.isnan().any() and not engine.head_kv[0][1].isnan().any()
    np.testing.assert_allclose(policy.act_chunk(obs), reference_chunk(obs), atol=1e-5)
