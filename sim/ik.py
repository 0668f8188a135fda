"""Inverse kinematics of the arm's tool point by damped least squares on the site Jacobian."""

from __future__ import annotations

import mujoco
import numpy as np

ARM_JOINTS = ("j1", "j2", "j3", "j4", "j5", "j6")


def down_rotation(yaw: float) -> np.ndarray:
    """Tool frame pointing straight down (z = -world z), its x axis at `yaw` in the table plane."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])


def tool_yaw(xmat: np.ndarray) -> float:
    r = xmat.reshape(3, 3)
    return float(np.arctan2(r[1, 0], r[0, 0]))


class ArmIK:
    """Solves joint positions for a tool pose; works on its own MjData so the sim is untouched."""

    def __init__(self, model: mujoco.MjModel, site: str = "tcp", damping: float = 1e-2):
        self.model = model
        self.data = mujoco.MjData(model)
        self.site = model.site(site).id
        joints = [model.joint(n) for n in ARM_JOINTS]
        self.qadr = np.array([j.qposadr[0] for j in joints])
        self.dadr = np.array([j.dofadr[0] for j in joints])
        self.lo = np.array([j.range[0] for j in joints])
        self.hi = np.array([j.range[1] for j in joints])
        self.damping = damping
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))

    def forward(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.data.qpos[self.qadr] = q
        mujoco.mj_kinematics(self.model, self.data)
        return self.data.site_xpos[self.site].copy(), self.data.site_xmat[self.site].reshape(3, 3).copy()

    def solve(self, q0: np.ndarray, pos: np.ndarray, rot: np.ndarray, iters: int = 50,
              tol: float = 1e-4) -> np.ndarray:
        q = np.clip(np.asarray(q0, dtype=np.float64).copy(), self.lo, self.hi)
        lam2 = self.damping**2
        for _ in range(iters):
            cur_pos, cur_rot = self.forward(q)
            err = np.empty(6)
            err[:3] = pos - cur_pos
            err[3:] = 0.5 * sum(np.cross(cur_rot[:, i], rot[:, i]) for i in range(3))
            if np.linalg.norm(err[:3]) < tol and np.linalg.norm(err[3:]) < 10 * tol:
                break
            mujoco.mj_comPos(self.model, self.data)
            mujoco.mj_jacSite(self.model, self.data, self._jacp, self._jacr, self.site)
            jac = np.vstack([self._jacp[:, self.dadr], self._jacr[:, self.dadr]])
            dq = jac.T @ np.linalg.solve(jac @ jac.T + lam2 * np.eye(6), err)
            step = np.abs(dq).max()
            if step > 0.3:
                dq *= 0.3 / step
            q = np.clip(q + dq, self.lo, self.hi)
        return q
