"""From chunks to one action per control step, around any chunk source: a `Policy`, a
`PolicyClient` (the queue then saves round trips to the server), or a custom object with
`spec`, `reset(seed)` and `act_chunk(obs) -> (horizon, action_dim)`.

  - `ChunkQueue` ("queue"): execute the first n_action_steps of a chunk, then re-plan.
  - `TemporalEnsemble` ("temporal"): ACT's temporal ensembling: re-plan every step, average every
    chunk's prediction for the current step with weights exp(-k * i), i = 0 for the oldest one.
  - `AdaptiveEnsemble` ("adaptive"): CogACT's adaptive ensemble: re-plan every step, weight past
    predictions for the current step by exp(alpha * cosine similarity to the newest one).

Each reports its last step's timing (`last_infer_ms`: the chunk source's time when it was called,
None when the action came from a chunk already planned), so nobody needs to look inside.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np


class ActionSelector:
    def __init__(self, source):
        self.source = source
        self.last_infer_ms: float | None = None

    @property
    def spec(self):
        return self.source.spec

    def reset(self, seed: int | None = None) -> None:
        self.source.reset(seed)
        self._reset()

    def _reset(self) -> None:
        raise NotImplementedError

    def act_chunk(self, obs: dict) -> np.ndarray:
        return self.source.act_chunk(obs)

    def _plan(self, obs: dict) -> np.ndarray:
        t0 = time.perf_counter()
        chunk = np.asarray(self.source.act_chunk(obs))
        self.last_infer_ms = (time.perf_counter() - t0) * 1e3
        return chunk

    def act(self, obs: dict) -> np.ndarray:
        self.last_infer_ms = None
        return self._act(obs)


class ChunkQueue(ActionSelector):
    def __init__(self, source, n_action_steps: int | None = None):
        super().__init__(source)
        self.n_action_steps = n_action_steps or source.spec.n_action_steps
        self.queue: deque = deque()

    def _reset(self) -> None:
        self.queue.clear()

    def _act(self, obs: dict) -> np.ndarray:
        if not self.queue:
            self.queue.extend(self._plan(obs)[: self.n_action_steps])
        return self.queue.popleft()


class _Ensemble(ActionSelector):
    """Re-plans every step; the prediction for "now" of the chunk made i steps ago is its row i."""

    def __init__(self, source):
        super().__init__(source)
        self.history: deque = deque(maxlen=source.spec.horizon)

    def _reset(self) -> None:
        self.history.clear()

    def _act(self, obs: dict) -> np.ndarray:
        self.history.append(self._plan(obs))
        n = len(self.history)
        preds = np.stack([c[n - 1 - j] for j, c in enumerate(self.history)])  # oldest first
        w = self.weights(preds)
        return (w[:, None] * preds).sum(0) / w.sum()


class TemporalEnsemble(_Ensemble):
    def __init__(self, source, k: float = 0.01):
        super().__init__(source)
        self.k = k

    def weights(self, preds: np.ndarray) -> np.ndarray:
        return np.exp(-self.k * np.arange(len(preds)))


class AdaptiveEnsemble(_Ensemble):
    def __init__(self, source, alpha: float = 0.1):
        super().__init__(source)
        self.alpha = alpha

    def weights(self, preds: np.ndarray) -> np.ndarray:
        newest = preds[-1]
        cos = preds @ newest / (np.linalg.norm(preds, axis=1) * np.linalg.norm(newest) + 1e-8)
        return np.exp(self.alpha * cos)


ENSEMBLES = {"queue": ChunkQueue, "temporal": TemporalEnsemble, "adaptive": AdaptiveEnsemble}


def make_selector(name: str, source, **options) -> ActionSelector:
    """"queue" (options: n_action_steps), "temporal" (k) or "adaptive" (alpha) around `source`."""
    if name not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {list(ENSEMBLES)}, got {name!r}")
    return ENSEMBLES[name](source, **options)
