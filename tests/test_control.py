"""The policy node's chunk playback and safety filter (no ROS needed)."""

import numpy as np
import pytest

from vla.ros_nodes.control import ChunkPlayer, SafetyFilter


def test_player_interpolates_holds_and_blends_without_a_jump():
    p = ChunkPlayer(fps=10, blend_s=0.2)
    assert p.command(0.0) is None
    p.push(np.arange(5.0)[:, None], t_obs=1.0, now=1.0)
    assert p.command(1.0)[0] == 0.0 and p.command(1.05)[0] == pytest.approx(0.5)
    assert p.command(5.0)[0] == 4.0  # past the end: hold the last step
    # a new chunk at t=1.2 that wants 10 from the start: cross-fade from the old trajectory
    p.push(np.full((5, 1), 10.0), t_obs=1.15, now=1.2)
    ts = np.arange(1.2, 1.6, 0.02)
    cmds = np.array([p.command(t)[0] for t in ts])
    assert cmds[0] == pytest.approx(2.0)  # continuous with the old chunk at the switch
    assert cmds[-1] == 10.0 and np.all(np.abs(np.diff(cmds)) < 1.0)  # no jump within the blend
    assert p.age(1.25) == pytest.approx(0.1)


def test_safety_clamps_limits_and_rate_and_never_passes_nan():
    s = SafetyFilter(lower=[-1, -1], upper=[1, 1], max_step=0.1)
    s.start_from(np.array([0.0, 0.0]))
    assert np.allclose(s.filter(np.array([5.0, -0.05])), [0.1, -0.05])  # rate-limited, then fine
    assert s.limit_hits.tolist() == [1, 0] and s.rate_hits.tolist() == [1, 0]
    for _ in range(30):
        cmd = s.filter(np.array([5.0, 0.0]))
    assert cmd[0] == 1.0  # the joint limit holds
    assert s.limit_hits.tolist() == [31, 0] and s.rate_hits.tolist() == [10, 0]  # 0.1 -> 1.0 in 9 more steps
    assert np.allclose(s.filter(np.array([np.nan, 0.0])), cmd)  # non-finite: hold
    assert np.allclose(s.filter(None), cmd)
    assert np.allclose(s.filter(np.array([1.0])), cmd)  # wrong size: hold
    assert s.clamped > 0


def test_safety_refuses_bad_limits_and_ignores_a_nan_start():
    with pytest.raises(ValueError, match="lower <= upper"):
        SafetyFilter([1.0], [0.0], 0.1)
    s = SafetyFilter([-1.0], [1.0], 0.1)
    s.start_from(np.array([np.nan]))
    assert s.hold() is None and s.filter(None) is None
