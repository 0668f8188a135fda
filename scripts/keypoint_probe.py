"""Can a spatial-softmax conv net (model.SpatialKeypoints) learn where MetaWorld's puck and goals are
from the demonstrations' layouts? Trains it alone (plus a task embedding) on frames with index <
EARLY of 40 episodes per task and reports the cm error on the first frames of the 10 held-out ones.

    .venv/bin/python scripts/keypoint_probe.py LOG_TEMPERATURE STEPS aug|noaug EARLY   # e.g. 2 1600 noaug 1
"""
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vla.dataset import LeRobotDataset
from vla.model import SpatialKeypoints
from vla.transforms import augment

torch.manual_seed(0); torch.set_num_threads(2)
temp0, steps, aug, early = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "aug", int(sys.argv[4])
ds = LeRobotDataset("data/mt10_96", horizon=1, cameras=["corner2"], image_size=96)
ep = ds.frame_episode; fi = ds.frame_index; ti = ds.task_index
# per task: its first 40 episodes train, the last 10 are held out
eps_of = {t: np.unique(ep[ti == t]) for t in np.unique(ti)}
held = np.concatenate([e[-10:] for e in eps_of.values()])
tr_rows = np.flatnonzero((fi < early) & ~np.isin(ep, held)); te_rows = np.flatnonzero((fi == 0) & np.isin(ep, held))
def load(rows):
    b = ds.batch(rows)
    return torch.from_numpy(np.ascontiguousarray(b["observation.images.corner2"])).permute(0, 3, 1, 2).float() / 255
Xtr, Xte = load(tr_rows), load(te_rows)
kp = torch.from_numpy(ds.env_state).float(); mu, sd = kp.mean(0), kp.std(0).clamp(min=1e-3)
Ytr, Yte = (kp[tr_rows] - mu) / sd, kp[te_rows]
Ttr, Tte = torch.from_numpy(ti[tr_rows]), torch.from_numpy(ti[te_rows])
print("train frames", len(tr_rows), "held-out first frames", len(te_rows), flush=True)
class Probe(nn.Module):
    def __init__(s):
        super().__init__(); s.sp = SpatialKeypoints(16); s.emb = nn.Embedding(10, 32)
        with torch.no_grad(): s.sp.log_temperature.fill_(temp0)
        s.head = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 6))
    def forward(s, x, t): return s.head(torch.cat([s.sp(x * 2 - 1), s.emb(t)], -1))
m = Probe(); opt = torch.optim.AdamW(m.parameters(), 1e-3, weight_decay=1e-4)
t0 = time.time()
for i in range(steps):
    j = torch.randint(0, len(Xtr), (64,)); x = Xtr[j]
    if aug: x = augment(x[:, None])[:, 0]
    loss = F.smooth_l1_loss(m(x, Ttr[j]), Ytr[j], beta=0.1)
    opt.zero_grad(); loss.backward(); opt.step()
    if (i + 1) % (steps // 4) == 0:
        with torch.no_grad():
            p = m(Xte * 1, Tte) * sd + mu
        err = torch.linalg.norm((p - Yte).view(-1, 2, 3), dim=-1) * 100
        base = torch.linalg.norm((mu - Yte).view(-1, 2, 3), dim=-1) * 100
        rows = [f"t{t}: obj {err[Tte == t, 0].mean():.1f} goal {err[Tte == t, 1].mean():.1f}" for t in range(3)]
        print(i + 1, f"{time.time() - t0:.0f}s loss {loss.item():.3f}", " | ".join(rows), f"| base obj {base[Tte < 3, 0].mean():.1f} goal {base[Tte < 3, 1].mean():.1f}", flush=True)
