"""The benchmark's own arithmetic: which matmuls a function dispatches, and the FLOPs its floor counts."""

import pytest
import torch

from vla.config import FastConfig, ServeConfig, fast_config, parse_fast_options
from vla.jobs.bench import CONFIGS, REFERENCE, PlainConfig, matmul_floor, record_matmuls


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
    assert parse_fast_options(["reuse_threshold=0.05", "refresh_every=4"]) == {"reuse_threshold": 0.05,
                                                                               "refresh_every": 4}
    with pytest.raises(ValueError, match="reuse_treshold"):
        parse_fast_options(["reuse_treshold=0.05"])  # misspelt key
    with pytest.raises(ValueError, match="reuse_max"):
        parse_fast_options(["reuse_max=2"])  # FastConfig's own check
    assert fast_config("reuse", ["reuse_threshold=0.1"]) == FastConfig(reuse=True, reuse_threshold=0.1)
    assert fast_config("off") is None
    with pytest.raises(ValueError, match="give --fast on, reuse or prune"):
        fast_config("off", ["reuse_threshold=0.1"])
    with pytest.raises(ValueError, match="exclusive"):
        fast_config("prune", ["reuse=true"])


def test_prune_keep_is_a_count_or_a_fraction_of_any_backbone_s_tokens():
    assert FastConfig(prune_keep=0.5).kept_tokens(16) == 8 and FastConfig(prune_keep=0.5).kept_tokens(64) == 32
    assert FastConfig(prune_keep=8).kept_tokens(64) == 8 and FastConfig().kept_tokens(64) == 0
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="prune_keep"):
            FastConfig(prune_keep=bad)


def test_every_bench_configuration_is_a_typed_config():
    """Configurations are PlainConfig / FastConfig objects, not labels the loop branches on."""
    assert all(isinstance(c, (PlainConfig, FastConfig)) for c in CONFIGS.values())
    assert CONFIGS[REFERENCE] == PlainConfig(prefix_cache=True)
    assert CONFIGS["plain, no prefix cache"] == PlainConfig(prefix_cache=False)


def test_a_serve_config_travels_as_json_and_bad_json_is_named():
    cfg = ServeConfig(policy="runs/x/final", bind="ipc:///tmp/a", fast=FastConfig(reuse=True, refresh_every=4),
                      threads=1)
    assert ServeConfig.from_json(cfg.to_json()) == cfg
    assert ServeConfig.from_json(ServeConfig(fast=None).to_json()).fast is None
    with pytest.raises(ValueError, match="unknown serve config keys"):
        ServeConfig.from_json('{"polcy": "x"}')
    with pytest.raises(ValueError, match="unknown fast config keys"):
        ServeConfig.from_json('{"fast": {"reuse_treshold": 1}}')
    with pytest.raises(ValueError, match="JSON object"):
        ServeConfig.from_json("[1]")
