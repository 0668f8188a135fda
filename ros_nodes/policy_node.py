"""The ROS2 policy node: cameras + joint states + instruction in, joint commands out at a fixed rate.

Inference runs in its own thread, off the control timer: the timer plays the current chunk
(`ChunkPlayer`, interpolated and cross-faded into each new chunk) through the always-on
`SafetyFilter`, so it never waits for the model. A watchdog holds position when images or joint
states go stale, an e-stop (topic and service) holds and latches until released, and malformed
messages are rejected with a logged reason and counted. Figures go out as JSON on the status topic.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import SetBool
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from vla.ros_nodes.control import ChunkPlayer, SafetyFilter

# The sim arm's limits (sim/assets/tabletop.xml) and the gripper's 0..1 command: defaults only;
# a real arm sets its own in the YAML.
DEFAULT_JOINTS = ["j1", "j2", "j3", "j4", "j5", "j6", "gripper"]
DEFAULT_LOWER = [-2.8, -1.9, -2.6, -2.9, -2.1, -2.9, 0.0]
DEFAULT_UPPER = [2.8, 1.9, 2.6, 2.9, 2.1, 2.9, 1.0]
COMMAND_QOS = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
LATCHED_QOS = QoSProfile(depth=1, reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)


def stamp_s(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def image_to_array(msg: Image, size: int) -> np.ndarray:
    """rgb8 / bgr8 of the expected size -> uint8 HxWx3 RGB; anything else raises ValueError."""
    if msg.encoding not in ("rgb8", "bgr8"):
        raise ValueError(f"encoding {msg.encoding!r} (expected rgb8 or bgr8)")
    if msg.height != size or msg.width != size:
        raise ValueError(f"size {msg.width}x{msg.height} (expected {size}x{size})")
    if msg.step != msg.width * 3 or len(msg.data) != msg.height * msg.step:
        raise ValueError(f"data of {len(msg.data)} bytes with step {msg.step} for {msg.width}x{msg.height} rgb")
    img = np.frombuffer(msg.data, dtype=np.uint8).reshape(size, size, 3)
    return img[..., ::-1].copy() if msg.encoding == "bgr8" else img.copy()


def _pct(xs, q) -> float | None:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else None


class PolicyNode(Node):
    def __init__(self, policy=None, **overrides):
        """policy: a `Policy` (or client) to use as is, or an artifact directory (the `policy`
        parameter); None: the `policy` parameter, by default the shipped artifact. overrides: other
        parameters by name."""
        if isinstance(policy, (str, os.PathLike)):
            overrides["policy"], policy = str(policy), None
        super().__init__("vla_policy", parameter_overrides=[])
        p = self.declare_parameters("", [
            ("policy", ""), ("remote", ""), ("fast", "on"), ("image_topic_prefix", "/camera"),
            ("joint_states_topic", "/joint_states"), ("instruction_topic", "/instruction"),
            ("command_topic", "/command"), ("command_type", "trajectory"), ("joint_names", DEFAULT_JOINTS),
            ("joint_lower", DEFAULT_LOWER), ("joint_upper", DEFAULT_UPPER), ("max_step", 0.05),
            ("control_rate", 50.0), ("watchdog_timeout", 0.5), ("blend_s", 0.2), ("status_topic", "/vla/status"),
            ("status_rate", 2.0), ("estop_topic", "/vla/estop"), ("replan_period", 0.4),
        ])
        for name, value in overrides.items():
            self.set_parameters([rclpy.parameter.Parameter(name, value=value)])
        g = lambda n: self.get_parameter(n).value  # noqa: E731
        self.policy = policy if policy is not None else self._load_policy(g("policy"), g("remote"), g("fast"))
        spec = self.policy.spec
        self.cameras, self.size = list(spec["cameras"]), spec["image_size"]
        self.joint_names = list(g("joint_names"))
        if len(self.joint_names) != spec["action_dim"] or len(self.joint_names) != spec["state_dim"]:
            raise ValueError(f"joint_names has {len(self.joint_names)} names; the policy's state/action "
                             f"dims are {spec['state_dim']}/{spec['action_dim']}")
        if g("command_type") not in ("trajectory", "float64_array"):
            raise ValueError(f"command_type must be trajectory or float64_array, got {g('command_type')!r}")
        self.command_type = g("command_type")
        self.period = 1.0 / g("control_rate")
        self.replan_period = g("replan_period")
        self.watchdog = g("watchdog_timeout")
        self.safety = SafetyFilter(g("joint_lower"), g("joint_upper"), g("max_step"))
        self.player = ChunkPlayer(spec.get("fps", 10), g("blend_s"))

        self.lock = threading.Lock()
        self.images: dict[str, tuple[np.ndarray, float]] = {}
        self.joints: tuple[np.ndarray, float] | None = None
        self.instruction: str | None = None
        self.estop = False
        self.rejected: Counter = Counter()
        self.infer_ms: deque = deque(maxlen=500)
        self.latency_ms: deque = deque(maxlen=500)
        self.jitter_ms: deque = deque(maxlen=2000)
        self.dropped = 0
        self.commands = 0
        self.safety_state = "waiting"
        self._last_tick: float | None = None
        self._pending_latency: float | None = None
        self._obs_version = 0
        self._reset_pending = True
        self._new_obs = threading.Condition(self.lock)

        sensors = ReentrantCallbackGroup()
        for cam in self.cameras:
            self.create_subscription(Image, f"{g('image_topic_prefix')}/{cam}/image_raw",
                                     lambda m, c=cam: self._on_image(c, m), qos_profile_sensor_data,
                                     callback_group=sensors)
        self.create_subscription(JointState, g("joint_states_topic"), self._on_joints, qos_profile_sensor_data,
                                 callback_group=sensors)
        self.create_subscription(String, g("instruction_topic"), self._on_instruction, LATCHED_QOS,
                                 callback_group=sensors)
        self.create_subscription(Bool, g("estop_topic"), lambda m: self._set_estop(m.data), COMMAND_QOS,
                                 callback_group=sensors)
        self.create_service(SetBool, "~/estop", self._on_estop_service, callback_group=sensors)
        msg_type = JointTrajectory if self.command_type == "trajectory" else Float64MultiArray
        self.cmd_pub = self.create_publisher(msg_type, g("command_topic"), COMMAND_QOS)
        self.status_pub = self.create_publisher(String, g("status_topic"), COMMAND_QOS)
        self.create_timer(self.period, self._on_control, callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(1.0 / g("status_rate"), self._publish_status, callback_group=sensors)
        self._running = True
        self._infer_thread = threading.Thread(target=self._infer_loop, name="vla-inference", daemon=True)
        self._infer_thread.start()

    def _load_policy(self, path: str, remote: str, fast: str):
        """A client of `remote`, or of an inference server this node starts in a child process: the
        model runs outside this process, so its many small torch calls never hold this process's
        GIL against the control timer."""
        from vla.ros_nodes.server import PolicyClient

        self._server = None
        if path and not remote and not (Path(path) / "config.json").is_file():
            raise ValueError(f"policy: {path} is not a policy artifact (no config.json there)")
        if not remote:
            import subprocess
            import sys
            import tempfile
            import uuid

            remote = f"ipc://{tempfile.gettempdir()}/vla-policy-{uuid.uuid4().hex[:12]}"
            cmd = [sys.executable, "-m", "vla.cli", "serve", "--bind", remote, "--fast", fast]
            self._server = subprocess.Popen(cmd + (["--policy", path] if path else []))
        deadline = time.monotonic() + 120
        while True:
            try:
                return PolicyClient(remote, timeout_ms=2000)
            except TimeoutError:
                if self._server is not None and self._server.poll() is not None:
                    raise RuntimeError(f"the inference server exited with {self._server.returncode}") from None
                if time.monotonic() > deadline:
                    raise

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        self.get_logger().warning(f"rejected {reason}: {detail}", throttle_duration_sec=2.0)

    # --- inputs ---
    def _on_image(self, cam: str, msg: Image) -> None:
        try:
            img = image_to_array(msg, self.size)
        except ValueError as e:
            return self._reject(f"image_{cam}", str(e))
        with self.lock:
            self.images[cam] = (img, stamp_s(msg), self.now())
            self._obs_version += 1
            self._new_obs.notify_all()

    def _on_joints(self, msg: JointState) -> None:
        names, pos = list(msg.name), list(msg.position)
        unknown = [n for n in names if n not in self.joint_names]
        if unknown:
            return self._reject("joint_state", f"unknown joint names {unknown}")
        if len(pos) != len(names):
            return self._reject("joint_state", f"{len(names)} names but {len(pos)} positions")
        missing = [n for n in self.joint_names if n not in names]
        if missing:
            return self._reject("joint_state", f"missing joints {missing}")
        q = np.array([pos[names.index(n)] for n in self.joint_names], dtype=np.float64)
        if not np.all(np.isfinite(q)):
            return self._reject("joint_state", f"non-finite position {q.tolist()}")
        with self.lock:
            if self.joints is None or self.safety.last is None:
                self.safety.start_from(q)
            self.joints = (q, self.now())

    def _on_instruction(self, msg: String) -> None:
        text = msg.data.strip()
        if not text:
            return self._reject("instruction", "empty instruction")
        with self.lock:  # every instruction starts an episode: drop the old chunk, move from where the arm is
            self.instruction = text
            self.player = ChunkPlayer(self.player.fps, self.player.blend_s)
            self.safety.last = None
            self.joints = None
            self._reset_pending = True  # the inference thread resets the policy before its next call

    def _set_estop(self, on: bool) -> None:
        with self.lock:
            if on and not self.estop:
                self.get_logger().warning("E-STOP: holding position (latched until released)")
            if not on and self.estop:
                self.get_logger().info("e-stop released")
                self.player = ChunkPlayer(self.player.fps, self.player.blend_s)  # no stale chunk after a stop
            self.estop = bool(on)

    def _on_estop_service(self, request, response):
        self._set_estop(request.data)
        response.success, response.message = True, "e-stop engaged" if request.data else "e-stop released"
        return response

    def _fresh(self, now: float) -> bool:
        if self.joints is None or now - self.joints[1] > self.watchdog:
            return False
        return all(c in self.images and now - self.images[c][2] <= self.watchdog for c in self.cameras)

    # --- inference, off the control timer ---
    def _infer_loop(self) -> None:
        seen, last_start = -1, -float("inf")
        while self._running:
            wait = last_start + self.replan_period - time.monotonic()
            if wait > 0:  # re-plan at a fixed period: the chunk covers the time between
                time.sleep(wait)
            with self.lock:
                self._new_obs.wait_for(lambda: self._obs_version != seen or not self._running, timeout=0.5)
                if not self._running:
                    return
                if self._obs_version == seen:
                    continue
                seen = self._obs_version  # not ready below: wait for the next observation, do not spin
                if self.estop or self.instruction is None or not self._fresh(self.now()):
                    continue
                obs = {f"observation.images.{c}": self.images[c][0] for c in self.cameras}
                obs["observation.state"] = self.joints[0].astype(np.float32)
                obs["task"] = self.instruction
                t_obs = min(self.images[c][1] for c in self.cameras)
                reset, self._reset_pending = self._reset_pending, False
            last_start = time.monotonic()
            t0 = time.perf_counter()
            try:
                if reset:
                    self.policy.reset(0)
                chunk = np.asarray(self.policy.act_chunk(obs), dtype=np.float64)
            except Exception as e:  # a bad model call or a lost server: keep running, hold on the watchdog
                self._reject("inference", f"{type(e).__name__}: {e}")
                time.sleep(0.05)
                continue
            self.infer_ms.append((time.perf_counter() - t0) * 1e3)
            with self.lock:
                if not self.estop:
                    self.player.push(chunk, t_obs, self.now())
                    self._pending_latency = t_obs

    # --- the control timer ---
    def _on_control(self) -> None:
        now = self.now()
        if self._last_tick is not None:
            dt = now - self._last_tick
            self.jitter_ms.append(abs(dt - self.period) * 1e3)
            if dt > 1.5 * self.period:
                self.dropped += int(dt / self.period - 0.5)
        self._last_tick = now
        with self.lock:
            if self.estop:
                state, cmd = "estop", self.safety.hold()
            elif not self._fresh(now):
                state, cmd = ("stale" if self.joints is not None else "waiting"), self.safety.hold()
            else:
                target = self.player.command(now)
                state = "ok" if target is not None else "waiting"
                cmd = self.safety.filter(target) if target is not None else self.safety.hold()
            self.safety_state = state
            pending, self._pending_latency = self._pending_latency, None
        if cmd is None:
            return
        self._publish_command(cmd)
        if pending is not None and state == "ok":
            self.latency_ms.append((self.now() - pending) * 1e3)

    def _publish_command(self, cmd: np.ndarray) -> None:
        if not np.all(np.isfinite(cmd)):  # unreachable through SafetyFilter; never publish one anyway
            return
        if self.command_type == "trajectory":
            msg = JointTrajectory()
            msg.header.stamp = self.get_clock().now().to_msg()
            msg.joint_names = self.joint_names
            point = JointTrajectoryPoint()
            point.positions = [float(x) for x in cmd]
            point.time_from_start.nanosec = int(self.period * 1e9)
            msg.points = [point]
        else:
            msg = Float64MultiArray()
            msg.data = [float(x) for x in cmd]
        self.cmd_pub.publish(msg)
        self.commands += 1

    def status(self) -> dict:
        now = self.now()
        return {
            "safety": self.safety_state, "estop": self.estop, "commands": self.commands,
            "infer_ms_p50": _pct(self.infer_ms, 50), "infer_ms_p99": _pct(self.infer_ms, 99),
            "latency_ms_p50": _pct(self.latency_ms, 50), "latency_ms_p99": _pct(self.latency_ms, 99),
            "jitter_ms_p50": _pct(self.jitter_ms, 50), "jitter_ms_p99": _pct(self.jitter_ms, 99),
            "dropped_periods": self.dropped, "chunk_age_s": min(self.player.age(now), 1e9),
            "clamped": self.safety.clamped, "rejected": dict(self.rejected),
            "limit_hits": dict(zip(self.joint_names, self.safety.limit_hits.tolist())),
            "rate_hits": dict(zip(self.joint_names, self.safety.rate_hits.tolist())),
        }

    def _publish_status(self) -> None:
        self.status_pub.publish(String(data=json.dumps(self.status())))

    def destroy_node(self):
        if not hasattr(self, "_infer_thread"):  # __init__ failed before starting it (bad parameters)
            return super().destroy_node()
        self._running = False
        with self.lock:
            self._new_obs.notify_all()
        self._infer_thread.join(2)
        if getattr(self, "_server", None) is not None:
            self._server.terminate()
            try:
                self._server.wait(10)
            except Exception:
                self._server.kill()
        return super().destroy_node()
