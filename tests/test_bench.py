"""The benchmark's own arithmetic: which matmuls a function dispatches, and the FLOPs its floor counts."""

import torch

from vla.jobs.bench import matmul_floor, record_matmuls


def _two_matmuls():
    lin = torch.nn.Linear(8, 5)
    x, a, b = torch.randn(3, 8), torch.randn(4, 2, 6), torch.randn(4, 6, 7)

    def fn():
        with torch.no_grad():
            lin(x)  # addmm(bias, x, W^T)
            torch.bmm(a, b)
            x @ torch.randn(8, 2)  # mm
    return fn


def test_record_matmuls_sees_each_call_with_its_shapes():
    calls = record_matmuls(_two_matmuls())
    assert calls == [("addmm", ((5,), (3, 8), (8, 5))), ("bmm", ((4, 2, 6), (4, 6, 7))), ("mm", ((3, 8), (8, 2)))]


def test_matmul_floor_counts_the_flops_of_every_call():
    floor = matmul_floor(_two_matmuls(), torch.device("cpu"), repeats=3)
    assert floor["calls"] == 3
    assert round(floor["gflop"] * 1e9) == 2 * (3 * 8 * 5 + 4 * 2 * 6 * 7 + 3 * 8 * 2)
    assert floor["ms"] > 0


def test_fast_opt_pairs_become_fast_config_options_and_bad_ones_are_named():
    import pytest

    from vla.cli import _fast_opts

    assert _fast_opts(["reuse_threshold=0.05", "refresh_every=4"]) == {"reuse_threshold": 0.05, "refresh_every": 4}
    with pytest.raises(ValueError, match="reuse_treshold"):
        _fast_opts(["reuse_treshold=0.05"])  # misspelt key
    with pytest.raises(ValueError, match="reuse_max"):
        _fast_opts(["reuse_max=2"])  # FastConfig's own check
