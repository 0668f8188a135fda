"""The policy's spec: a validated, frozen record that round-trips through spec.json and the wire."""

import dataclasses
import json

import pytest

from vla.policies import Policy, shipped_policy
from vla.spec import PolicySpec, SpecError

GOOD = {"cameras": ["front", "wrist"], "image_size": 96, "state_dim": 7, "action_dim": 7, "horizon": 16,
        "n_action_steps": 8, "fps": 10, "state_names": [f"j{i}" for i in range(7)], "action_names": None,
        "robot_type": "arm"}


def test_round_trip_and_what_the_shipped_artifacts_say():
    spec = PolicySpec.from_dict(GOOD)
    assert spec.cameras == ("front", "wrist") and PolicySpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    shipped = Policy.from_pretrained(shipped_policy()).spec
    assert isinstance(shipped, PolicySpec) and shipped.horizon == 16 and shipped.fps == 10
    assert shipped.observation_keys() == {"observation.images.front", "observation.images.wrist",
                                          "observation.state", "task"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        shipped.horizon = 8


@pytest.mark.parametrize("change,error", [
    ({"cameras": []}, "at least one"), ({"cameras": ["front", "front"]}, "distinct"),
    ({"image_size": 0}, "image_size must be a positive int"), ({"horizon": 16.0}, "horizon must be a positive int"),
    ({"n_action_steps": 20}, "exceeds the horizon"), ({"fps": -1}, "fps must be a positive number"),
    ({"state_names": ["a"]}, "1 channel names for 7 channels"), ({"cameras": "front"}, "list of names"),
    ({"extra": 1}, "unknown ['extra']"),
])
def test_a_bad_spec_gets_one_error_naming_the_field(change, error):
    with pytest.raises(SpecError, match=error.replace("[", r"\[").replace("]", r"\]")):
        PolicySpec.from_dict({**GOOD, **change})
    missing = dict(GOOD)
    del missing["horizon"]
    with pytest.raises(SpecError, match=r"missing \['horizon'\]"):
        PolicySpec.from_dict(missing)
