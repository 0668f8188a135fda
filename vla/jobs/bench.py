"""`vla bench`: the control step of a policy artifact, per stage and per configuration.

Frames come from a real sim rollout (the plain policy drives the arm; every control step's
observation is kept), so consecutive frames are what a robot sees. Each configuration then runs
one model call per recorded frame with the same noise, and we report the median and p99 of
preprocess / backbone / head / total, ratios against the plain path, the action error against
the exact path, the machine's measured fp32 matmul peak and the fraction of it the backbone reaches.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from vla.config import FastConfig, parse_fast_options
from vla.fast import FastVLA
from vla.kernels.attention import cached_attention, cached_attention_ref
from vla.kernels.denoise import denoise_update, denoise_update_ref, sampler_update
from vla.kernels.frame_diff import region_change, region_change_ref
from vla.policies import Policy, shipped_policy
from vla.sim import EVAL_SEED_START, make_env


@dataclass(frozen=True)
class PlainConfig:
    """The model's own path (VLA.encode + VLA.sample); without the prefix cache the backbone re-runs
    at every denoising step, as a loop that does not cache it pays."""
    prefix_cache: bool = True


REFERENCE = "plain + prefix cache"  # the exact path every configuration's actions are compared with
CONFIGS: dict[str, PlainConfig | FastConfig] = {
    "plain, no prefix cache": PlainConfig(prefix_cache=False),
    REFERENCE: PlainConfig(),  # the training-time path
    "fast (text K/V, fused kernels)": FastConfig(),
    "fast + token reuse": FastConfig(reuse=True),
    "fast + FastV keep 50%": FastConfig(prune_keep=0.5),
    "fast + compile": FastConfig(compile=True),
    "fast + token reuse + compile": FastConfig(reuse=True, compile=True),
    "fast + CUDA graph": FastConfig(cuda_graph=True),  # CUDA only
    "fast + token reuse + CUDA graph": FastConfig(reuse=True, cuda_graph=True),  # CUDA only
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(n: int = 1024, repeats: int = 20, device: str | torch.device = "cpu") -> float:
    """Best fp32 n x n matmul rate (on CUDA: n=8192 and TF32 off, so it is fp32, not tensor-core TF32)."""
    device = torch.device(device)
    if device.type == "cuda":
        n = max(n, 8192)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def record_rollout(policy, task: str, steps: int, seed: int) -> list[dict]:
    spec = policy.spec
    env = make_env(task, image_size=spec.image_size, cameras=tuple(spec.cameras))
    obs, _ = env.reset(seed=seed)
    policy.reset(seed)
    frames = []
    for _ in range(steps):
        frames.append(obs)
        obs, _, terminated, truncated, _ = env.step(policy.act(obs))
        if terminated or truncated:
            obs, _ = env.reset(seed=seed + len(frames))
            policy.reset(seed)
    env.close()
    return frames


def _plain_step(model, images, ids, mask, state, noise, cfg: PlainConfig, timings: dict):
    """The model's own path. Its preprocessing (normalize, resize) happens inside encode, so it
    counts in the backbone here."""
    device = images.device
    t0 = time.perf_counter()
    if cfg.prefix_cache:
        cache = model.encode(images[None], ids, mask, state[None])
        _sync(device)
        backbone = time.perf_counter() - t0
        out = model.sample(cache, noise=noise)
    else:  # what a loop without the prefix cache pays: the backbone at every denoising step
        backbone, out, sampler = 0.0, noise, model.sampler
        for t, coef in zip(sampler.times, sampler.coefs.to(device)):
            _sync(device)
            s = time.perf_counter()
            cache = model.encode(images[None], ids, mask, state[None])
            _sync(device)
            backbone += time.perf_counter() - s
            out = sampler_update(out, model.head(out, torch.full((1,), t, device=device), cache), coef)
    _sync(device)
    total = time.perf_counter() - t0
    timings.update(preprocess=0.0, backbone=backbone, head=total - backbone)
    return out


def _stats(xs: list[float]) -> dict:
    ms = np.asarray(xs) * 1e3
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 10) -> float:
    """Median wall time of fn over `repeats` calls after `warmup`, synchronizing CUDA around each."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def count_gflop(fn) -> float:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops() / 1e9


def backbone_gflop(model, images, ids, mask, state) -> float:
    """The model's own backbone pass (text tokens included)."""
    return count_gflop(lambda: model.encode(images[None], ids, mask, state[None]))


def fast_full_encode(model, images, text, state):
    """A closure running the fast path's full backbone step (visual + state tokens; the text's
    keys/values cached), eager."""
    engine = FastVLA(model, FastConfig(), images.device)
    with torch.no_grad():
        engine.set_instruction(text)
        x, state_token = engine.preprocess(images), model.state_proj(state[None])

    full = torch.arange(engine.tokens, device=images.device)

    def run():
        with torch.no_grad():
            engine._encode(x, [full] * engine.n_cam, state_token)
    return run


_MATMULS = ("mm", "addmm", "bmm", "baddbmm")


def record_matmuls(fn) -> list[tuple[str, tuple]]:
    """Runs fn once and returns every matmul it dispatched: (op name, argument shapes)."""
    calls = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in _MATMULS:
                calls.append((name, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return calls


def matmul_floor(fn, device: torch.device, repeats: int = 200) -> dict:
    """The time fn's matmuls take when each runs alone, at its own shape, on fresh random operands:
    what fn would take if everything else in it (norms, softmax, copies, launches, the wrapper) were
    free. Its FLOP rate bounds the fraction of the matmul peak that fn can reach."""
    calls = record_matmuls(fn)
    total_s, flop = 0.0, 0
    for (name, shapes), count in sorted(Counter(calls).items()):
        args = [torch.randn(*sh, device=device) for sh in shapes]
        op = getattr(torch.ops.aten, name)
        total_s += count * median_seconds(lambda: op(*args), device, repeats)
        a, b = shapes[-2], shapes[-1]  # (..., m, k) @ (..., k, n)
        flop += count * 2 * int(np.prod(a)) * b[-1]
    return {"calls": len(calls), "ms": total_s * 1e3, "gflop": flop / 1e9}


def run_bench(policy_dir, task: str = "pick_cube", steps: int = 60, warmup: int = 5, threads: int = 2,
              configs: list[str] | None = None, seed: int = EVAL_SEED_START, device: str = "cpu",
              fast_opts: dict | None = None) -> dict:
    """On CUDA the rollout is recorded on the CPU, then the model and every input move to the GPU;
    the CUDA-graph configurations run there only. fast_opts: FastConfig options for every fast
    configuration (e.g. reuse_threshold)."""

    torch.set_num_threads(threads)
    device = torch.device(device)
    policy = Policy.from_pretrained(policy_dir)
    model = policy.model
    frames = record_rollout(policy, task, steps + warmup, seed)
    g = torch.Generator().manual_seed(0)
    noises = [torch.randn(1, policy.horizon, policy.spec.action_dim, generator=g).to(device) for _ in frames]
    inputs = [tuple(t[0].to(device) for t in policy.prepare(o)) for o in frames]
    model.to(device)
    text = frames[0]["task"]
    ids, mask = model.backbone.tokenize([text], device)
    result = {"policy": str(policy_dir), "task": task, "frames": steps, "threads": threads,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "fast_opts": dict(fast_opts or {}), "configs": {}}
    reference = None
    for name in configs or list(CONFIGS):
        cfg = CONFIGS[name]
        fast = isinstance(cfg, FastConfig)
        if fast and cfg.cuda_graph and device.type != "cuda":
            continue
        if fast and fast_opts:
            cfg = dataclasses.replace(cfg, **fast_opts)
        # one compiled engine per process, as in use: the previous configuration's compiled graphs
        # would otherwise stay in dynamo's cache, and every later call would check their guards first
        torch._dynamo.reset()
        engine = FastVLA(model, cfg, device) if fast else None
        stages = {k: [] for k in ("preprocess", "backbone", "head", "total")}
        outs = []
        t_compile = time.perf_counter()
        with torch.no_grad():
            for i, ((images, state), noise) in enumerate(zip(inputs, noises)):
                timings: dict = {}
                t0 = time.perf_counter()
                if engine is None:
                    out = _plain_step(model, images, ids, mask, state, noise, cfg, timings)
                else:
                    engine.timings = timings
                    out = engine.step(images, text, state, noise)
                _sync(device)
                total = time.perf_counter() - t0
                if i == warmup - 1:
                    t_compile = time.perf_counter() - t_compile
                if i >= warmup:
                    for k in ("preprocess", "backbone", "head"):
                        stages[k].append(timings[k])
                    stages["total"].append(total)
                    outs.append(out)
        entry = {k: _stats(v) for k, v in stages.items()}
        entry["warmup_s"] = t_compile
        if engine is not None:
            entry["engine_stats"] = dict(engine.stats)
        if reference is None and name == REFERENCE:
            reference = outs
        if reference is not None:
            err = torch.stack([(a - b).abs().max() for a, b in zip(outs, reference)])
            entry["max_abs_action_error_vs_exact"] = {"median": float(err.median()), "max": float(err.max())}
        result["configs"][name] = entry
    base = next(iter(result["configs"].values()))  # ratios against the first configuration run
    for entry in result["configs"].values():
        entry["speedup_vs_first"] = base["total"]["median_ms"] / entry["total"]["median_ms"]
    peak = matmul_peak_gflops(device=device)
    images, state = inputs[0]
    gflop = backbone_gflop(model, images, ids, mask, state)
    fast_encode = fast_full_encode(model, images, text, state)  # one engine for the count and the floor
    fast_gflop = count_gflop(fast_encode)
    result["matmul_peak_gflops"] = peak
    result["backbone_gflop_per_step"] = gflop
    result["fast_backbone_gflop_per_step"] = fast_gflop
    floor = matmul_floor(fast_encode, device)
    floor["fraction_of_peak"] = floor["gflop"] / (floor["ms"] / 1e3) / peak
    result["fast_backbone_matmul_floor"] = floor
    for name, entry in result["configs"].items():
        # FLOPs of the work each path does on a full step: the fast path skips the (cached) text
        # tokens; with token reuse this is the effective rate (a partial step does less)
        work = fast_gflop if isinstance(CONFIGS[name], FastConfig) else gflop
        entry["backbone_fraction_of_peak"] = work / (entry["backbone"]["median_ms"] / 1e3) / peak
    return result


def format_bench(r: dict) -> str:
    head = (f"{'configuration':34s} {'preproc':>9s} {'backbone':>17s} {'head':>17s} {'total':>17s} "
            f"{'speedup':>7s} {'peak%':>6s}")
    lines = [f"policy {r['policy']}  task {r['task']}  {r['frames']} consecutive frames, {r['threads']} threads, "
             f"device {r.get('device', 'cpu')}" + (f", fast options {r['fast_opts']}" if r.get("fast_opts") else ""),
             "median / p99 ms per control step", head]
    for name, e in r["configs"].items():
        def mp(k):
            return f"{e[k]['median_ms']:7.2f} /{e[k]['p99_ms']:7.2f}"
        lines.append(f"{name:34s} {e['preprocess']['median_ms']:9.2f} {mp('backbone'):>17s} {mp('head'):>17s} "
                     f"{mp('total'):>17s} {e['speedup_vs_first']:6.1f}x {100 * e['backbone_fraction_of_peak']:5.1f}%")
    lines.append(f"fp32 matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s; backbone "
                 f"{r['backbone_gflop_per_step'] * 1e3:.1f} MFLOP per step (fast path, text cached: "
                 f"{r['fast_backbone_gflop_per_step'] * 1e3:.1f})")
    f = r.get("fast_backbone_matmul_floor")
    if f:
        lines.append(f"fast backbone's {f['calls']} matmuls, each timed alone at its shape: {f['ms']:.2f} ms, "
                     f"{100 * f['fraction_of_peak']:.0f} % of the peak: the most the backbone could reach")
    for name, e in r["configs"].items():
        extra = []
        if "engine_stats" in e:
            s = e["engine_stats"]
            extra.append(f"full {s['full']} partial {s['partial']}")
        if "max_abs_action_error_vs_exact" in e:
            a = e["max_abs_action_error_vs_exact"]
            extra.append(f"action error vs exact (normalized units) median {a['median']:.4f} max {a['max']:.4f}")
        if e.get("warmup_s", 0) > 5:
            extra.append(f"warm-up (compile) {e['warmup_s']:.0f} s")
        if extra:
            lines.append(f"  {name}: " + "; ".join(extra))
    return "\n".join(lines)


def kernel_bench(device: str = "cuda", repeats: int = 200) -> list[dict]:
    """Each kernel against its torch reference (eager) on the shapes of the shipped model's step,
    and on larger ones. Median microseconds per call."""

    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    def timed(fn) -> float:
        return median_seconds(fn, device, repeats) * 1e6

    def triton(fn):
        return lambda *args: fn(*args, force="triton")

    cases = []  # (name, kernel, its torch reference, arguments)
    # the shipped model's LM layer (GQA 4/2), its head's cross-attention, then larger prefixes
    for heads, kv_heads, n, p, d in ((4, 2, 33, 45, 32), (4, 4, 16, 45, 32), (8, 8, 64, 256, 64), (8, 2, 16, 512, 64)):
        mask = torch.ones(1, 1, n, p, dtype=torch.bool, device=device)
        cases.append((f"cached_attention Hq{heads} Hkv{kv_heads} q{n} kv{p} d{d}", triton(cached_attention),
                      cached_attention_ref, (rnd(1, heads, n, d), rnd(1, kv_heads, p, d), rnd(1, kv_heads, p, d),
                                             mask, d ** -0.5)))
    for cams, size, region in ((2, 64, 16), (2, 224, 28), (8, 512, 32)):
        cases.append((f"region_change {cams}x3x{size}x{size} region {region}", triton(region_change),
                      region_change_ref, (rnd(cams, 3, size, size), rnd(cams, 3, size, size), region)))
    for b, h, d, a in ((1, 16, 128, 7), (64, 16, 128, 7), (256, 50, 512, 32)):
        coef = torch.tensor([1.1, -0.5, 0.0, 1.0, 0.95, 0.2, 1.0], device=device)
        cases.append((f"denoise_update B{b} H{h} d{d} A{a}", triton(denoise_update), denoise_update_ref,
                      (rnd(b, h, d), rnd(d), rnd(d), rnd(a, d), rnd(a), rnd(b, h, a), coef)))
    rows = []
    for name, fast, ref, args in cases:
        err = float((fast(*args) - ref(*args)).abs().max())
        t_fast, t_ref = timed(lambda: fast(*args)), timed(lambda: ref(*args))
        rows.append({"kernel": name, "triton_us": t_fast, "torch_eager_us": t_ref,
                     "speedup": t_ref / t_fast, "max_abs_diff": err})
    return rows


# --- `vla bench` ---
def cmd_bench(args) -> int:
    if args.kernels:
        rows = kernel_bench(args.device)
        if args.json:
            print(json.dumps(rows, indent=2))
        for r in rows if not args.json else []:
            print(f"{r['kernel']:44s} triton {r['triton_us']:8.1f} us  torch {r['torch_eager_us']:8.1f} us  "
                  f"{r['speedup']:5.2f}x  max diff {r['max_abs_diff']:.1e}")
        return 0
    configs = None
    if args.configs:
        configs = [c.strip() for c in args.configs.split(";")]
        unknown = [c for c in configs if c not in CONFIGS]
        if unknown:
            print(f"error: unknown configurations {unknown}; known: {list(CONFIGS)}", file=sys.stderr)
            return 2
    try:
        opts = parse_fast_options(args.fast_opt)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = run_bench(args.policy or shipped_policy(), task=args.task, steps=args.steps, threads=args.threads,
                  configs=configs, device=args.device, fast_opts=opts)
    print(json.dumps(r, indent=2) if args.json else format_bench(r))
    return 0
