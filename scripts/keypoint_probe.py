"""Can a spatial-softmax conv net (model.SpatialKeypoints) learn where MetaWorld's puck and goals are
from the demonstrations' layouts? Trains it alone (plus a task embedding) on the frames with index
< --early of all but the last 10 episodes of each task, and prints the cm error on the first frames
of those 10 held-out episodes for the first three tasks (reach, push, pick-place in MT10). The
readout is an MLP over 16 maps' coordinates and a task embedding, or with --linear a per-task linear
map from that task's own two maps (or from --shared-maps maps), too small to memorize layouts.

    .venv/bin/python scripts/keypoint_probe.py data/mt10_96 --log-temperature 2 --steps 1600 --early 1
    .venv/bin/python scripts/keypoint_probe.py data/mt10_96 --log-temperature 2 --steps 1200 --early 1 --linear
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vla.dataset import LeRobotDataset
from vla.model import SpatialKeypoints
from vla.transforms import augment, frames_to_unit, normalize_images

HELD_OUT = 10  # episodes per task


class Probe(nn.Module):
    def __init__(self, tasks: int, log_temperature: float, maps: int = 16):
        super().__init__()
        self.spatial = SpatialKeypoints(maps)
        with torch.no_grad():
            self.spatial.log_temperature.fill_(log_temperature)
        self.task = nn.Embedding(tasks, 32)
        self.head = nn.Sequential(nn.Linear(2 * maps + 32, 128), nn.GELU(), nn.Linear(128, 6))

    def forward(self, frames: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.spatial(normalize_images(frames)), self.task(task)], -1))


class LinearProbe(nn.Module):
    """Two maps per task (object, goal), read by a per-task linear map from their four image
    coordinates: too little capacity to memorize layouts, so the maps must follow the objects."""

    def __init__(self, tasks: int, log_temperature: float, shared_maps: int = 0):
        super().__init__()
        self.shared = shared_maps
        self.spatial = SpatialKeypoints(shared_maps or 2 * tasks)
        with torch.no_grad():
            self.spatial.log_temperature.fill_(log_temperature)
        self.weight = nn.Parameter(torch.zeros(tasks, 2 * shared_maps or 4, 6))
        self.bias = nn.Parameter(torch.zeros(tasks, 6))

    def forward(self, frames: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        coords = self.spatial(normalize_images(frames))
        if not self.shared:  # the task's own two maps
            coords = coords.view(len(frames), -1, 4)[torch.arange(len(frames)), task]
        return torch.einsum("ni,nio->no", coords, self.weight[task]) + self.bias[task]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset")
    p.add_argument("--log-temperature", type=float, default=0.0, help="the spatial softmax's initial one")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--early", type=int, default=1, help="train on frames with frame_index below this")
    p.add_argument("--augment", action="store_true", help="the training's random shift and colour jitter")
    p.add_argument("--linear", action="store_true", help="LinearProbe: two maps per task, a linear readout")
    p.add_argument("--shared-maps", type=int, default=0, help="with --linear: this many maps for all tasks")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()

    torch.manual_seed(0)
    ds = LeRobotDataset(args.dataset, horizon=1)
    camera = ds.camera_keys[0]
    episode, frame, task = ds.frame_episode, ds.frame_index, ds.task_index
    held = np.concatenate([np.unique(episode[task == t])[-HELD_OUT:] for t in np.unique(task)])
    train_rows = np.flatnonzero((frame < args.early) & ~np.isin(episode, held))
    test_rows = np.flatnonzero((frame == 0) & np.isin(episode, held))

    def frames(rows):
        return frames_to_unit(torch.from_numpy(np.ascontiguousarray(ds.batch(rows)[camera])))

    x_train, x_test = frames(train_rows), frames(test_rows)
    keypoints = torch.from_numpy(ds.env_state).float()
    mean, std = keypoints.mean(0), keypoints.std(0).clamp(min=1e-3)
    y_train, y_test = (keypoints[train_rows] - mean) / std, keypoints[test_rows]
    t_train, t_test = torch.from_numpy(task[train_rows]), torch.from_numpy(task[test_rows])
    print(f"train frames {len(train_rows)}, held-out first frames {len(test_rows)}", flush=True)

    tasks = int(task.max()) + 1
    model = (LinearProbe(tasks, args.log_temperature, args.shared_maps) if args.linear
             else Probe(tasks, args.log_temperature))
    opt = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=1e-4)
    start = time.time()
    for i in range(args.steps):
        j = torch.randint(0, len(x_train), (64,))
        x = augment(x_train[j][:, None])[:, 0] if args.augment else x_train[j]
        loss = F.smooth_l1_loss(model(x, t_train[j]), y_train[j], beta=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (i + 1) % max(1, args.steps // 4) == 0:
            with torch.no_grad():
                pred = model(x_test, t_test) * std + mean
            err = torch.linalg.norm((pred - y_test).view(-1, 2, 3), dim=-1) * 100
            per_task = " | ".join(f"task {t}: object {err[t_test == t, 0].mean():.1f} goal {err[t_test == t, 1].mean():.1f}"
                                  for t in range(3))
            print(f"step {i + 1} ({time.time() - start:.0f} s) loss {loss.item():.3f} | {per_task}", flush=True)


if __name__ == "__main__":
    main()
