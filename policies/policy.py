"""The one Policy interface: reset() / act(obs) -> action / act_chunk(obs) -> chunk / spec.

Observations and actions are in raw units (the env's and the robot's); the policy normalizes and
un-normalizes itself with the stats stored in the artifact. `act` goes through an action selector
of policies/ensemble.py ("queue", the default; "temporal"; "adaptive"), the same ones that wrap any
other chunk source; `last_infer_ms` says what the last `act` cost.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from vla.artifact import load_artifact
from vla.errors import ObservationError, SpecMismatchError, brief
from vla.fast import FastVLA
from vla.policies.ensemble import make_selector
from vla.spec import PolicySpec
from vla.transforms import Normalizer, fit_frames, model_inputs

# An instruction is a sentence: longer text is refused before the tokenizer reads it (a 16 MiB task
# held a server for 13-17 s only to be truncated to max_text_tokens).
MAX_TASK_CHARS = 1000
# A normalized state this many standard deviations from the training data is no measurement; far
# beyond it the model's float32 arithmetic (squares in its norms) overflows to NaN.
MAX_STATE_STD = 1e6


def spec_mismatch(spec: PolicySpec, cameras, image_size: int, action_dim: int, state_dim: int | None = None) -> str | None:
    problems = []
    if list(spec.cameras) != list(cameras):
        problems.append(f"cameras {list(spec.cameras)} vs {list(cameras)}")
    if spec.image_size != image_size:
        problems.append(f"image size {spec.image_size} vs {image_size}")
    if spec.action_dim != action_dim:
        problems.append(f"action dim {spec.action_dim} vs {action_dim}")
    if state_dim is not None and spec.state_dim != state_dim:
        problems.append(f"state dim {spec.state_dim} vs {state_dim}")
    return "; ".join(problems) or None


class Policy:
    def __init__(self, model, spec: PolicySpec, normalizer: Normalizer, device: str | torch.device = "cpu",
                 ensemble: str = "queue", n_action_steps: int | None = None, temporal_k: float = 0.01,
                 adaptive_alpha: float = 0.1, seed: int = 0, fast=None):
        self.model = model.to(device).eval()
        self._spec = spec
        self.norm = normalizer
        self.device = torch.device(device)
        options = {"queue": {"n_action_steps": n_action_steps}, "temporal": {"k": temporal_k},
                   "adaptive": {"alpha": adaptive_alpha}}
        self.ensemble, self._selector_options = ensemble, options.get(ensemble, {})
        self.selector = make_selector(ensemble, self, **self._selector_options)
        self.horizon = spec.horizon
        self.cameras = list(spec.cameras)
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.engine = None
        if fast is not None:  # a vla.fast.FastConfig: the real-time step (caches, token reuse, kernels, compile)
            self.engine = FastVLA(self.model, fast, self.device)
        self.reset(seed)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", **kwargs) -> Policy:
        model, spec, norm = load_artifact(path, device)
        return cls(model, spec, norm, device=device, **kwargs)

    @property
    def spec(self) -> PolicySpec:
        """What the policy consumes and produces: cameras, image_size, state/action dims and names, fps."""
        return self._spec

    def check_compatible(self, cameras, image_size: int, action_dim: int, state_dim: int | None = None) -> None:
        problem = spec_mismatch(self._spec, cameras, image_size, action_dim, state_dim)
        if problem:
            raise SpecMismatchError(f"policy spec does not match the environment: {problem}")

    def reset(self, seed: int | None = None) -> None:
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(0 if seed is None else int(seed))
        self.selector._reset()  # its queue or ensembling history
        if self.engine is not None and self.engine.owner is self:
            self.engine.reset()

    def warmup(self) -> None:
        """One call on a blank observation, then a reset: the real-time step compiles (or captures
        its CUDA graphs) now instead of inside the first request."""
        s = self._spec.image_size
        obs = {f"observation.images.{c}": np.zeros((s, s, 3), np.uint8) for c in self.cameras}
        obs["observation.state"] = self.norm.state_mean.numpy()
        obs["task"] = "warm up"
        self.act_chunk(obs)
        self.reset()

    def fork(self) -> Policy:
        """Another policy over the same model, engine and caches of tokenized text, with its own
        episode state (queue, ensembling history, noise generator): one per client of a server.
        The engine's frame caches belong to one policy at a time: it is reset when another uses it."""
        other = copy.copy(self)
        other.selector = make_selector(self.ensemble, other, **self._selector_options)
        other.reset()
        return other

    # --- model calls ---
    def _check(self, obs: dict) -> None:
        for cam in self.cameras:
            key = f"observation.images.{cam}"
            if key not in obs:
                raise ObservationError(f"observation lacks {key!r} (the policy expects cameras {self.cameras})")
            img = np.asarray(obs[key])
            sizes = self._spec.frame_sizes(cam)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.shape[:2] not in sizes:
                want = " or ".join(f"{h}x{w}x3" for h, w in sizes)
                raise ObservationError(f"{key} must be uint8 {want}, got {img.dtype} {img.shape}")
        try:
            with np.errstate(over="ignore"):  # a float64 past float32's range becomes inf: refused below
                state = np.asarray(obs.get("observation.state", ()), dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ObservationError(f"observation.state is not a vector of numbers: {e}") from None
        if state.shape != (self._spec.state_dim,):
            raise ObservationError(f"observation.state must have shape ({self._spec.state_dim},), got {state.shape}")
        if not np.all(np.isfinite(state)):
            raise ObservationError(f"observation.state has a non-finite value: {brief(state.tolist())}")
        z = self.norm.state(torch.from_numpy(state)).abs().max().item()
        if not z <= MAX_STATE_STD:  # also catches inf from an overflowing normalization
            raise ObservationError(f"observation.state {brief(state.tolist())} lies {z:.3g} standard deviations "
                                   f"from the training data (limit {MAX_STATE_STD:g}): not a measurement")
        task = obs.get("task")
        if not isinstance(task, str):
            raise ObservationError("observation lacks the instruction string 'task'")
        if not task.strip():
            raise ObservationError("the instruction 'task' is empty")
        if len(task) > MAX_TASK_CHARS:
            raise ObservationError(f"the instruction 'task' has {len(task)} characters; the limit is {MAX_TASK_CHARS}")

    def _text(self, task: str):
        if task not in self._text_cache:
            if len(self._text_cache) >= 64:  # bounded: every distinct task a client sends is one entry
                self._text_cache.pop(next(iter(self._text_cache)))
            self._text_cache[task] = self.model.backbone.tokenize([task], self.device)
        return self._text_cache[task]

    def prepare(self, obs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A checked observation -> images (1, n_cam, 3, S, S) in [0, 1] and normalized state (1, state_dim)."""
        s, fit = self._spec.image_size, self._spec.image_fit
        batch = {f"observation.images.{c}": fit_frames(np.asarray(obs[f"observation.images.{c}"])[None], s, fit)
                 for c in self.cameras}
        batch["observation.state"] = np.asarray(obs["observation.state"])[None]
        return model_inputs(batch, self.cameras, self.norm, self.device)

    def act_chunk(self, obs: dict) -> np.ndarray:
        """A chunk (horizon x action_dim) of raw actions for this observation."""
        self._check(obs)
        return self._chunk(obs)

    @torch.no_grad()
    def _chunk(self, obs: dict) -> np.ndarray:
        images, state = self.prepare(obs)
        noise = torch.randn((1, self.horizon, self._spec.action_dim), generator=self.generator).to(self.device)
        if self.engine is not None:
            if self.engine.owner is not self:  # another fork's frames are in its caches
                self.engine.reset()
                self.engine.owner = self
            chunk = self.engine.step(images[0], obs["task"], state[0], noise)
        else:
            ids, mask = self._text(obs["task"])
            chunk = self.model.sample(self.model.encode(images, ids, mask, state), noise=noise)
        chunk = self.norm.unaction(chunk)[0].float().cpu().numpy()
        if not np.all(np.isfinite(chunk)):  # never hand out NaN; and drop every cache it may have touched
            if self.engine is not None:
                self.engine.reset()
            raise ObservationError("the model produced non-finite actions for this observation")
        return chunk

    @torch.no_grad()
    def keypoints(self, obs: dict) -> np.ndarray:
        """The keypoint head's reading of this observation in the dataset's units (the sim: the named
        object's xyz, then its goal's xyz, in metres)."""
        if self.model.keypoint_head is None:
            raise ValueError("this policy has no keypoint head (model.keypoints: 0)")
        if self.norm.keypoint_mean is None:
            raise ValueError("this artifact's stats.json has no keypoint normalization (trained before it was saved)")
        self._check(obs)
        images, state = self.prepare(obs)
        ids, mask = self._text(obs["task"])
        _, memory, spatial, _, instruction = self.model.encode(images, ids, mask, state, return_memory=True)
        raw = self.model.keypoints_from_memory(memory, spatial, instruction)
        return self.norm.keypoints(raw)[0].float().cpu().numpy()

    def act(self, obs: dict) -> np.ndarray:
        self._check(obs)  # also when the action comes from the queue: bad input is refused every step
        return self.selector.act(obs)

    @property
    def last_infer_ms(self) -> float | None:
        """The model's time in the last `act` (None: that action had been planned before)."""
        return self.selector.last_infer_ms
