"""Messages of a contract's topics, in arrival order -> aligned episodes -> a LeRobotDataset v3.

`Recording` is what `vla record` (live, ros_nodes/recorder.py) and `vla import-bag` (a rosbag2,
ros_nodes/bags.py) both feed: the same decoding (ros_nodes/contract.py), the same frame alignment
and the same episode split, so one run recorded both ways gives the same dataset.

Episodes: a start marker on the contract's `episodes.marker_topic` (or a start call, or the start
of a bag) begins one at its time, an end marker (a stop call, the end of a bag) ends it at its time;
its frames in between are written as one episode (a failed one is discarded when the contract says
so); frames outside any episode (a recorder started mid-episode) are dropped. Each
episode is written and committed on its own (DatasetWriter.flush), so a crash loses at most the
episode in progress and the dataset on disk stays readable.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from vla.dataset import DatasetWriter
from vla.ros_nodes.contract import (
    Contract,
    ContractError,
    FrameAligner,
    decode,
    episode_marker,
    sample_time,
    stack_frames,
)

KEEP_OUTSIDE_S = 2.0  # frames decided outside an episode wait this long for a start marker stamped before them


class Recording:
    def __init__(self, contract: Contract, out: str | Path, task: str | None = None, video: bool = True,
                 robot_type: str | None = None, lag_s: float | None = None, min_frames: int = 2):
        self.contract = contract
        self.writer = DatasetWriter(out, contract.fps, contract.features(video=video), robot_type=robot_type,
                                    extra_info={"ros_contract": contract.signature()})
        self.aligner = FrameAligner(contract, lag_s)
        self.task = task  # fixed, or None: the instruction topic's
        self.instruction: str | None = None
        self.frames: list[tuple[float, dict, str | None]] = []  # decided, not yet written: (t, row, task)
        self.episode_start = -math.inf  # the episode in progress holds the frames from this time on
        self.active = False  # an episode is in progress
        self.min_frames = min_frames
        self.counts = Counter()  # episodes, frames, discarded, ...
        self.rejected: Counter = Counter()  # stream -> messages refused (decode errors)
        self.late: Counter = Counter()  # stream -> samples that arrived after their frames were decided
        self.problems: dict[str, str] = {}  # stream -> the last refusal's reason
        self.stale_before: Counter = Counter()  # the aligners' counts of recordings before restart()
        self.out_of_order_before: Counter = Counter()

    def restart(self) -> None:
        """A new recording into the same dataset (the next bag): a new clock, nothing in progress;
        an episode still in progress never ended and is not written."""
        if self.active:
            self.counts["unfinished"] += 1
        self.stale_before += self.aligner.stale
        self.out_of_order_before += self.aligner.out_of_order
        self.aligner = FrameAligner(self.contract, self.aligner.lag)
        self.frames, self.instruction, self.episode_start, self.active = [], None, -math.inf, False

    # --- input, in arrival order ---
    def on_message(self, key: str, msg, received_s: float, strict: bool = False) -> None:
        """A message of feature `key`'s topic; a bad one is refused and counted (strict: raised)."""
        stream = self.contract.streams[key]
        try:
            value = decode(msg, stream)
        except ContractError as e:
            if strict:
                raise
            self.rejected[key] += 1
            self.problems[key] = str(e)
            return
        t = sample_time(msg, stream, received_s)
        if t < self.aligner.last_t - self.aligner.lag:
            self.late[key] += 1
        if not self.aligner.push(key, t, value):
            if strict:
                raise ContractError(f"{stream.topic}: stamp {t:.6f} is before the last one's "
                                    f"({self.aligner.times[key][-1]:.6f}): out of order")
            self.problems[key] = f"stamp {t:.6f} out of order"

    def on_instruction(self, text: str) -> None:
        text = str(text).strip()
        if text:
            self.instruction = text

    def on_marker(self, text: str, received_s: float) -> dict | None:
        """A marker-topic message: starts or ends an episode; -> the summary of one written."""
        marker = episode_marker(text, received_s)
        if marker is None:
            return None
        event, at, success = marker
        self.poll(received_s)
        if event == "start":
            if self.active:  # a start without an end: the one in progress never finished
                self.counts["unfinished"] += 1
            self.start(at)
            return None
        return self.end_episode(at, success)

    def poll(self, now: float | None) -> None:
        """Take the frames decided by `now` (None: all of them, the recording ended)."""
        task = self.task or self.instruction
        self.frames += [(t, row, task) for t, row in self.aligner.frames(now)]
        if not self.active and now is not None:  # outside an episode: kept a little, for a late start marker
            self.frames = [f for f in self.frames if f[0] >= now - KEEP_OUTSIDE_S]

    # --- episodes ---
    def start(self, at_s: float) -> None:
        """The frames from `at_s` on form an episode (those before are dropped)."""
        self.frames = [f for f in self.frames if f[0] >= at_s]
        self.episode_start, self.active = at_s, True

    def discard(self, at_s: float) -> int:
        """Drop the episode in progress (the operator says it failed); nothing is recorded until the next start."""
        dropped = sum(1 for f in self.frames if f[0] < at_s)
        self.frames = [f for f in self.frames if f[0] >= at_s]
        if self.active:
            self.counts["discarded"] += 1
        self.active = False
        return dropped

    def end_episode(self, end_s: float, success: bool | None = None) -> dict | None:
        """Write the episode in progress: its frames before `end_s` (unless failed and the contract
        discards failures, or too short). -> its summary or None."""
        episode = [f for f in self.frames if self.episode_start <= f[0] < end_s]
        self.frames = [f for f in self.frames if f[0] > end_s]
        was_active, self.active = self.active, False
        if not was_active or not episode:
            return None
        if success is False and self.contract.discard_failed:
            self.counts["discarded"] += 1
            return None
        if len(episode) < self.min_frames:
            self.counts["too_short"] += 1
            return None
        task = episode[0][2]
        if not task:
            raise ContractError("an episode has no task: give one (--task) or publish the contract's "
                                "instruction_topic")
        self.writer.add_episode(stack_frames(self.contract, [(t, row) for t, row, _ in episode]), task)
        self.writer.flush()  # committed: a crash from here on does not lose it
        self.counts["episodes"] += 1
        self.counts["frames"] += len(episode)
        return {"episode_index": self.writer.num_episodes - 1, "frames": len(episode), "task": task,
                "start_s": episode[0][0], "end_s": episode[-1][0]}

    def close(self) -> None:
        """The end of the recording: an episode still in progress is not written (it never ended)."""
        if self.active:
            self.counts["unfinished"] += 1
        self.active = False
        self.writer.flush()

    def report(self) -> dict:
        return {**self.counts, "stale": dict(self.stale_before + self.aligner.stale), "rejected": dict(self.rejected),
                "late": dict(self.late), "out_of_order": dict(self.out_of_order_before + self.aligner.out_of_order),
                "problems": dict(self.problems)}
