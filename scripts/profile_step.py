"""Per-stage median ms of the compiled fast step on a real rollout, under inductor variants, and
optionally torch.profiler's operator table: where the step's time goes (docs/benchmarks-log.md, session 6).

    .venv/bin/python scripts/profile_step.py [--policy DIR] [--threads N] [--eager]
        [--freeze] [--cpp-wrapper] [--gemm-template] [--skip-guards] [--profile]
"""

import argparse

import numpy as np
import torch
import torch._inductor.config as inductor

from vla.bench import _inputs, record_rollout
from vla.cli import shipped_policy
from vla.fast import FastConfig, FastVLA
from vla.policies import Policy

p = argparse.ArgumentParser()
p.add_argument("--policy", default=str(shipped_policy()))
p.add_argument("--threads", type=int, default=2)
p.add_argument("--eager", action="store_true", help="the fast step without torch.compile")
p.add_argument("--freeze", action="store_true", help="inductor freezing (constant weights, prepacked)")
p.add_argument("--cpp-wrapper", action="store_true", help="inductor's C++ wrapper instead of Python")
p.add_argument("--gemm-template", action="store_true", help="max_autotune with the CPP GEMM template")
p.add_argument("--skip-guards", action="store_true", help="skip dynamo guard evaluation after warm-up")
p.add_argument("--profile", action="store_true", help="print torch.profiler's table over 20 steps")
args = p.parse_args()

torch.set_num_threads(args.threads)
inductor.freezing = args.freeze
inductor.cpp_wrapper = args.cpp_wrapper
if args.gemm_template:
    inductor.max_autotune, inductor.max_autotune_gemm_backends = True, "CPP,ATEN"
policy = Policy.from_pretrained(args.policy)
frames = record_rollout(policy, "pick_cube", 45, 1_000_000)
inputs = [_inputs(policy, o) for o in frames]
text, noise = frames[0]["task"], torch.zeros(1, policy.horizon, policy.spec["action_dim"])
engine = FastVLA(policy.model, FastConfig(compile=not args.eager))
with torch.no_grad():
    for images, state in inputs[:5]:
        engine.step(images, text, state, noise)
    if args.skip_guards:
        torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    stages = {"preprocess": [], "backbone": [], "head": []}
    for images, state in inputs[5:] * 3:
        engine.timings = {}
        engine.step(images, text, state, noise)
        for k in stages:
            stages[k].append(engine.timings[k] * 1e3)
    print({k: round(float(np.median(v)), 2) for k, v in stages.items()})
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for images, state in inputs[5:25]:
                engine.step(images, text, state, noise)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
