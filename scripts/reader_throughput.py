"""How fast the dataset reader feeds training when the dataset is larger than its frame cache.

Writes (once) a synthetic robot dataset the size of a real one (two cameras at 480x640, AV1 as
LeRobot encodes, or h264; 30 fps), then reads one epoch of training batches in the windowed order
`vla train` uses for it, with frames fitted to the model's size on decode, and prints samples/s,
decoded frames/s and the cache's size against the dataset's.

    .venv/bin/python scripts/reader_throughput.py DIR [--episodes 40] [--frames 150] [--codec av1]
        [--cache-mb 256] [--image-size 96] [--batch 64] [--threads 2]
"""
import argparse
import time

import numpy as np
import torch

from vla.dataset import DatasetWriter, LeRobotDataset, video_feature
from vla.training import Batches


def write(root, episodes: int, frames: int, codec: str, h: int = 480, w: int = 640) -> None:
    feats = {f"observation.images.{c}": video_feature(h, w, 30, codec) for c in ("high", "wrist")}
    feats["observation.state"] = {"dtype": "float32", "shape": [14], "names": None}
    feats["action"] = {"dtype": "float32", "shape": [14], "names": None}
    writer = DatasetWriter(root, 30, feats, episodes_per_file=10)
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    for e in range(episodes):
        t = np.arange(frames)[:, None, None]
        base = (128 + 80 * np.sin(x[None] / 37.0 + y[None] / 53.0 + t / 9.0 + e)).astype(np.uint8)
        video = np.repeat(base[..., None], 3, -1)
        video[:, 200:280, (e * 7) % 500:(e * 7) % 500 + 80] = (40, 200, 90)  # an object
        state = np.cumsum(rng.normal(0, 0.02, (frames, 14)), 0).astype(np.float32)
        writer.add_episode({"observation.images.high": video, "observation.images.wrist": video[:, ::-1].copy(),
                            "observation.state": state, "action": state}, f"task {e % 5}")
    writer.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--codec", default="av1")
    p.add_argument("--cache-mb", type=float, default=256)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        LeRobotDataset(args.root)
    except Exception:
        t0 = time.perf_counter()
        write(args.root, args.episodes, args.frames, args.codec)
        print(f"wrote {args.root}: {args.episodes} x {args.frames} frames, 2 cameras 480x640 {args.codec}, "
              f"{time.perf_counter() - t0:.0f} s")
    ds = LeRobotDataset(args.root, horizon=16, image_size=args.image_size, cache_mb=args.cache_mb)
    fitted_mb = len(ds) * len(ds.camera_keys) * args.image_size ** 2 * 3 / 2 ** 20
    raw_gb = len(ds) * len(ds.camera_keys) * 480 * 640 * 3 / 2 ** 30
    window = 0 if ds.cache_frames >= len(ds) else ds.cache_frames // 2
    batches = Batches(len(ds), args.batch, 0, episode_of=ds.frame_episode, window=window)
    n, t0 = 0, time.perf_counter()
    while batches.epoch == 0:
        idx = batches.next()
        if batches.epoch:
            break
        ds.batch(idx)
        n += len(idx)
    dt = time.perf_counter() - t0
    decoded = ds.cache.misses and sum(int(ds.ep_end[j] - ds.ep_start[j]) for j in range(len(ds.episodes))) * 2
    print(f"{len(ds)} samples ({raw_gb:.1f} GB decoded at 480x640, {fitted_mb:.0f} MB at {args.image_size} px) "
          f"through a {ds.cache.max_bytes / 2 ** 20:.0f} MB cache (window {window} frames): {n} samples in "
          f"{dt:.1f} s = {n / dt:.0f} samples/s, {decoded / dt:.0f} frames/s decoded + fitted; "
          f"{ds.cache.misses} episode decodes, {ds.cache.hits} hits")


if __name__ == "__main__":
    main()
