"""The ROS2 policy node: cameras + joint states + instruction in, joint commands out at a fixed rate.

Inference runs in its own thread, off the control timer: the timer plays the current chunk
(`ChunkPlayer`, interpolated and cross-faded into each new chunk) through the always-on
`SafetyFilter`, so it never waits for the model. Every control period publishes a command; the
robot only ever moves through the safety filter's joint and rate limits.

Holds: the node holds the last command (and discards the plan, so nothing planned before is
played afterwards; the next chunk blends in from the held command) when
  - an image or the joint state goes stale: nothing accepted within `watchdog_timeout`, by
    receive time and by header stamp (stamps must advance, and lie within `watchdog_timeout` +
    `stamp_tolerance` in the past and `stamp_tolerance` in the future of the node's clock, which
    is the simulation's with `use_sim_time`);
  - the e-stop is engaged (topic or service): latched until an explicit reset, see `_on_estop_service`;
  - the policy fails: a call raises, its server dies (a local one is restarted with backoff, a
    remote one reconnected) or a chunk is not (horizon x action_dim) and finite.
A new instruction also discards the plan, and the arm holds its last command until the new plan
blends in from there. The service `~/reset` (std_srvs/Trigger) is for a robot that was moved
(homed by hand, a simulator's episode reset): the node forgets its command and starts again from
the first joint state stamped after the call. Malformed messages are rejected with a logged reason and counted. Figures go
out as JSON on the status topic and as diagnostic_msgs/DiagnosticArray on /diagnostics.

Start it alone against a robot with `vla node --ros-args --params-file configs/policy_node.yaml`
(or the `vla-policy-node` script); `vla run` starts it beside the simulated arm.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import SetBool, Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from vla.config import ServeConfig, fast_config
from vla.ros_nodes.contract import (
    ARRAY,
    COMPRESSED,
    IMAGE,
    JOINT_STATE,
    STRING,
    TRAJECTORY,
    Contract,
    Stream,
    decode,
    decode_image,
    decode_vector,
    load_contract,
    stamp_s,
)
from vla.ros_nodes.control import ChunkError, ChunkPlayer, SafetyFilter, check_chunk
from vla.ros_nodes.inference import LocalInferenceServer
from vla.serving import PolicyClient, ServerError

# The sim arm's limits (sim/assets/tabletop.xml) and the gripper's 0..1 command: defaults only;
# a real arm sets its own in the YAML.
DEFAULT_JOINTS = ["j1", "j2", "j3", "j4", "j5", "j6", "gripper"]
DEFAULT_LOWER = [-2.8, -1.9, -2.6, -2.9, -2.1, -2.9, 0.0]
DEFAULT_UPPER = [2.8, 1.9, 2.6, 2.9, 2.1, 2.9, 1.0]
COMMAND_QOS = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
ESTOP_BEST_EFFORT_QOS = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.BEST_EFFORT)
LATCHED_QOS = QoSProfile(depth=1, reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
MESSAGE_CLASSES = {IMAGE: Image, COMPRESSED: CompressedImage, JOINT_STATE: JointState, TRAJECTORY: JointTrajectory,
                   ARRAY: Float64MultiArray, STRING: String}  # a contract's type names -> rclpy's classes
ESTOP_ASSERTED_S = 1.0  # an e-stop True on the topic this recent means the button is still pressed
LEVELS = {"ok": DiagnosticStatus.OK, "waiting": DiagnosticStatus.WARN, "stale": DiagnosticStatus.WARN,
          "estop": DiagnosticStatus.ERROR, "fault": DiagnosticStatus.ERROR}


def image_to_array(msg: Image, sizes: list[tuple[int, int]]) -> np.ndarray:
    """An image of one of the expected (H, W) sizes -> uint8 HxWx3 RGB, decoded as the recorder and
    the bag importer decode (vla.ros_nodes.contract); anything else raises ValueError."""
    if (msg.height, msg.width) not in sizes:
        want = " or ".join(f"{w}x{h}" for h, w in sizes)
        raise ValueError(f"size {msg.width}x{msg.height} (expected {want})")
    return decode_image(msg, IMAGE)


def joint_positions(msg: JointState, names: list[str]) -> np.ndarray:
    """The positions of `names` from a JointState (extra joints are ignored); raises ValueError on
    duplicate, missing or non-finite entries."""
    return decode_vector(msg, Stream("observation.state", "/joint_states", JOINT_STATE, names=tuple(names)))


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
        self.declare_parameters("", [
            ("policy", ""), ("remote", ""), ("remote_server_key", ""), ("remote_secret_key_file", ""),
            ("fast", "on"), ("server_threads", 1), ("image_topic_prefix", "/camera"),
            ("joint_states_topic", "/joint_states"), ("instruction_topic", "/instruction"),
            ("command_topic", "/command"), ("command_type", "trajectory"), ("joint_names", DEFAULT_JOINTS),
            ("joint_lower", DEFAULT_LOWER), ("joint_upper", DEFAULT_UPPER), ("max_step", 0.05),
            ("control_rate", 50.0), ("watchdog_timeout", 0.5), ("stamp_check", True), ("stamp_tolerance", 0.2),
            ("blend_s", 0.2), ("status_topic", "/vla/status"), ("status_rate", 2.0),
            ("estop_topic", "/vla/estop"), ("replan_period", 0.4), ("contract", ""),
        ])
        for name, value in overrides.items():
            self.set_parameters([rclpy.parameter.Parameter(name, value=value)])
        g = lambda n: self.get_parameter(n).value  # noqa: E731
        self._local = None
        self.policy = policy if policy is not None else self._load_policy(g)
        spec = self.policy.spec
        self.cameras = list(spec.cameras)
        self.frame_sizes = {c: spec.frame_sizes(c) for c in self.cameras}
        self.horizon, self.action_dim = spec.horizon, spec.action_dim
        self.joint_names = list(g("joint_names"))
        self.contract: Contract | None = None
        try:
            if g("contract"):
                self._use_contract(load_contract(g("contract")), spec)
            self._check_parameters(spec, g)
        except ValueError:
            if self._local is not None:  # no orphaned server process behind a refused configuration
                self._local.stop()
            raise
        if self.contract is None:
            self.command_type = g("command_type")
        self.period = 1.0 / g("control_rate")
        self.replan_period = g("replan_period")
        self.watchdog = g("watchdog_timeout")
        self.stamp_check, self.stamp_tolerance = g("stamp_check"), g("stamp_tolerance")
        self.safety = SafetyFilter(g("joint_lower"), g("joint_upper"), g("max_step"))
        self.player = ChunkPlayer(spec.fps, g("blend_s"))

        self.lock = threading.Lock()
        self.images: dict[str, tuple[np.ndarray, float, float]] = {}  # camera -> (image, stamp, received)
        self.joints: tuple[np.ndarray, float, float] | None = None  # (positions, stamp, received)
        self.last_stamp: dict[str, float] = {}  # stream -> stamp of its last accepted message
        self.input_problems: dict[str, str] = {}  # stream -> why its last message was refused
        self.instruction: str | None = None
        self.estop = False
        self._estop_asserted_at: float | None = None  # receive time of the topic's last True
        self.fault: str | None = None
        self._start_after = -float("inf")  # joint states stamped before a `~/reset` call are ignored
        self.plan_epoch = 0  # +1 whenever the plan is discarded: a chunk from an older epoch is dropped
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
        c = self.contract
        for cam in self.cameras:
            topic = c.streams[f"observation.images.{cam}"].topic if c else f"{g('image_topic_prefix')}/{cam}/image_raw"
            msg_type = MESSAGE_CLASSES[c.streams[f"observation.images.{cam}"].msgtype] if c else Image
            self.create_subscription(msg_type, topic, lambda m, c=cam: self._on_image(c, m), qos_profile_sensor_data,
                                     callback_group=sensors)
        self.create_subscription(JointState, c.streams["observation.state"].topic if c else g("joint_states_topic"),
                                 self._on_joints, qos_profile_sensor_data, callback_group=sensors)
        self.create_subscription(String, (c.instruction_topic if c and c.instruction_topic else g("instruction_topic")),
                                 self._on_instruction, LATCHED_QOS, callback_group=sensors)
        # A RELIABLE subscription never matches a BEST_EFFORT publisher (joystick and button nodes
        # often are): subscribe both ways; a reliable publisher's message then arrives twice, which
        # engaging a latch does not mind.
        quiet = SubscriptionEventCallbacks(incompatible_qos=lambda event: None)  # the other one matches
        for qos in (COMMAND_QOS, ESTOP_BEST_EFFORT_QOS):
            self.create_subscription(Bool, g("estop_topic"), self._on_estop_topic, qos, callback_group=sensors,
                                     event_callbacks=quiet)
        self.create_service(SetBool, "~/estop", self._on_estop_service, callback_group=sensors)
        self.create_service(Trigger, "~/reset", self._on_reset_service, callback_group=sensors)
        msg_type = JointTrajectory if self.command_type == "trajectory" else Float64MultiArray
        self.cmd_pub = self.create_publisher(msg_type, c.streams["action"].topic if c else g("command_topic"),
                                             COMMAND_QOS)
        self.status_pub = self.create_publisher(String, g("status_topic"), COMMAND_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", COMMAND_QOS)
        self.create_timer(self.period, self._on_control, callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(1.0 / g("status_rate"), self._publish_status, callback_group=sensors)
        self._running = True
        self._infer_thread = threading.Thread(target=self._infer_loop, name="vla-inference", daemon=True)
        self._infer_thread.start()

    def _load_policy(self, g):
        """A client of `remote`, or of an inference server this node starts in a child process."""
        path, remote = g("policy"), g("remote")
        if remote:
            server_key = g("remote_server_key").encode() or None
            secret = g("remote_secret_key_file")
            secret_key = Path(secret).read_text().strip().encode() if secret else None
            deadline = time.monotonic() + 120
            while True:
                try:
                    return PolicyClient(remote, timeout_ms=2000, curve_server_key=server_key,
                                        curve_secret_key=secret_key)
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
        if path and not (Path(path) / "config.json").is_file():
            raise ValueError(f"policy: {path} is not a policy artifact (no config.json there)")
        config = ServeConfig(policy=path or None, fast=fast_config(g("fast")), threads=g("server_threads"))
        self._local = LocalInferenceServer(config)
        return self._local.start()

    def _use_contract(self, contract: Contract, spec) -> None:
        """Topics, joint names, command type and decoding from a topic contract, checked against the
        policy (and against the contract its training data was recorded with, where it records one)."""
        if spec.ros_contract is not None:
            contract.check_matches(spec.ros_contract, "the policy's training data")
        cams = contract.cameras
        if set(cams) != set(self.cameras):
            raise ValueError(f"{contract.source}: cameras {cams}, the policy's are {self.cameras}")
        for cam in self.cameras:
            s = contract.streams[f"observation.images.{cam}"]
            if tuple(s.size) not in self.frame_sizes[cam]:
                raise ValueError(f"{contract.source}: camera {cam} frames are {s.size[1]}x{s.size[0]}, the policy "
                                 f"takes {' or '.join(f'{w}x{h}' for h, w in self.frame_sizes[cam])}")
        state, action = contract.streams["observation.state"], contract.streams["action"]
        if state.msgtype != JOINT_STATE:
            raise ValueError(f"{contract.source}: the policy node reads the state from {JOINT_STATE}, "
                             f"not {state.msgtype}")
        if action.msgtype not in (TRAJECTORY, ARRAY):
            raise ValueError(f"{contract.source}: the policy node publishes {TRAJECTORY} or {ARRAY}, "
                             f"not {action.msgtype}")
        if state.names != action.names:
            raise ValueError(f"{contract.source}: the policy node commands the joints it measures: state names "
                             f"{list(state.names)} != action names {list(action.names)}")
        self.contract, self.joint_names = contract, list(state.names)
        self.command_type = "trajectory" if action.msgtype == TRAJECTORY else "float64_array"

    def _check_parameters(self, spec, g) -> None:
        if len(self.joint_names) != spec.action_dim or len(self.joint_names) != spec.state_dim:
            raise ValueError(f"joint_names has {len(self.joint_names)} names; the policy's state/action "
                             f"dims are {spec.state_dim}/{spec.action_dim}")
        if len(set(self.joint_names)) != len(self.joint_names):
            raise ValueError(f"joint_names has duplicates: {self.joint_names}")
        if g("command_type") not in ("trajectory", "float64_array"):
            raise ValueError(f"command_type must be trajectory or float64_array, got {g('command_type')!r}")

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        self.get_logger().warning(f"rejected {reason}: {detail}", throttle_duration_sec=2.0)

    def _discard_plan(self) -> None:
        """Under the lock: nothing planned so far is played; the next chunk blends in from the command held now."""
        self.plan_epoch += 1
        self.player.restart(self.safety.hold())

    # --- inputs ---
    def _stamp_problem(self, stream: str, stamp: float, now: float) -> str | None:
        if not self.stamp_check:
            return None
        if now - stamp > self.watchdog + self.stamp_tolerance:
            return f"stamp {now - stamp:.3f} s old (limit watchdog_timeout + stamp_tolerance)"
        if stamp - now > self.stamp_tolerance:
            return f"stamp {stamp - now:.3f} s ahead of this node's clock (stamp_tolerance {self.stamp_tolerance} s)"
        last = self.last_stamp.get(stream)
        if last is not None and stamp <= last:
            return f"stamp {stamp:.6f} does not advance (last accepted {last:.6f})"
        return None

    def _accept(self, stream: str, msg, decode):
        """decode() the message, check its stamp; the value, or None with the rejection counted."""
        try:
            value = decode()
        except ValueError as e:
            self.input_problems[stream] = str(e)
            return self._reject(stream, str(e))
        stamp, now = stamp_s(msg), self.now()
        problem = self._stamp_problem(stream, stamp, now)
        if problem:
            self.input_problems[stream] = problem
            return self._reject(f"stamp_{stream}", problem)
        self.input_problems.pop(stream, None)
        self.last_stamp[stream] = stamp
        return value, stamp, now

    def _decode_image(self, cam: str, msg) -> np.ndarray:
        if self.contract is not None:  # decoded (and resized) exactly as the recorder decodes
            return decode(msg, self.contract.streams[f"observation.images.{cam}"])
        return image_to_array(msg, self.frame_sizes[cam])

    def _decode_joints(self, msg: JointState) -> np.ndarray:
        if self.contract is not None:
            return decode(msg, self.contract.streams["observation.state"])
        return joint_positions(msg, self.joint_names)

    def _on_image(self, cam: str, msg: Image) -> None:
        got = self._accept(f"image_{cam}", msg, lambda: self._decode_image(cam, msg))
        if got is None:
            return
        with self.lock:
            self.images[cam] = got
            self._obs_version += 1
            self._new_obs.notify_all()

    def _on_joints(self, msg: JointState) -> None:
        got = self._accept("joint_state", msg, lambda: self._decode_joints(msg))
        if got is None:
            return
        with self.lock:
            if (got[1] if self.stamp_check else got[2]) < self._start_after:
                return  # measured before the robot was moved (`~/reset`)
            if self.safety.last is None:
                self.safety.start_from(got[0])  # the first command moves from the measured position
            self.joints = got

    def _on_instruction(self, msg: String) -> None:
        text = msg.data.strip()
        if not text:
            return self._reject("instruction", "empty instruction")
        with self.lock:  # a new episode: re-plan from the command held now (never from the measured position)
            self.instruction = text
            self._discard_plan()
            self._reset_pending = True  # the inference thread resets the policy before its next call

    def _on_reset_service(self, request, response):
        """The robot was moved: no command until a joint state measured after this call, then
        move from there. The e-stop, if engaged, stays engaged."""
        with self.lock:
            self._discard_plan()
            self.player.restart(None)
            self.safety.last = None
            self.joints = None
            self._start_after = self.now()
            self._reset_pending = True
        response.success, response.message = True, "commands start again from the next measured position"
        return response

    def _engage_estop(self, source: str) -> None:
        with self.lock:
            if not self.estop:
                self.get_logger().warning(f"E-STOP from {source}: holding position (latched until reset)")
                self._discard_plan()
            self.estop = True

    def _on_estop_topic(self, msg: Bool) -> None:
        """True engages the stop; False only says the button is no longer pressed: it never releases."""
        if msg.data:
            self._estop_asserted_at = self.now()
            self._engage_estop("topic")
        else:
            self._estop_asserted_at = None

    def _on_estop_service(self, request, response):
        """SetBool True engages; False is the explicit reset, refused while the topic still asserts
        the stop. A release needs this deliberate call, as industrial e-stops (ISO 13850) and
        ros2_control hardware interfaces do: a button node that publishes its state continuously
        would otherwise release the stop the moment the button is let go."""
        if request.data:
            self._engage_estop("service")
            response.success, response.message = True, "e-stop engaged"
            return response
        asserted = self._estop_asserted_at
        if asserted is not None and self.now() - asserted < ESTOP_ASSERTED_S:
            response.success, response.message = False, "e-stop still asserted on the topic: release it first"
            return response
        with self.lock:
            if self.estop:
                self.get_logger().info("e-stop reset")
                self._discard_plan()  # no chunk planned before the stop is played after it
            self.estop = False
        response.success, response.message = True, "e-stop released"
        return response

    def _fresh(self, now: float) -> bool:
        streams = [self.joints] + [self.images.get(c) for c in self.cameras]
        if any(s is None or now - s[2] > self.watchdog for s in streams):
            return False
        return not self.stamp_check or all(now - s[1] <= self.watchdog + self.stamp_tolerance for s in streams)

    # --- inference, off the control timer ---
    def _infer_loop(self) -> None:
        seen, last_start, failures = -1, -float("inf"), 0
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
                epoch = self.plan_epoch
            last_start = time.monotonic()
            t0 = time.perf_counter()
            try:
                if reset:
                    self.policy.reset(0)
                chunk = check_chunk(self.policy.act_chunk(obs), self.horizon, self.action_dim)
            except Exception as e:  # a bad chunk, a refused observation or a lost server: hold, report, recover
                failures += 1
                self._policy_failed(e, failures)
                continue
            failures = 0
            self.infer_ms.append((time.perf_counter() - t0) * 1e3)
            with self.lock:
                if not self.estop and epoch == self.plan_epoch:
                    self.player.push(chunk, t_obs, self.now())
                    self._pending_latency = t_obs
                    self.fault = None

    def _policy_failed(self, error: Exception, failures: int) -> None:
        kind = "chunk" if isinstance(error, ChunkError) else "inference"
        detail = f"{type(error).__name__}: {error}"
        self._reject(kind, detail)
        with self.lock:
            self.fault = f"{kind}: {detail}"[:300]
            self._discard_plan()
            self._reset_pending = True  # a restarted or reconnected server starts a new session
        if isinstance(error, ServerError):  # it answered: alive, this observation or chunk was refused
            return time.sleep(0.05)
        if self._local is not None and (self._local.exited() is not None or isinstance(error, TimeoutError)):
            self._restart_local(failures)
        else:  # a remote server, or a policy object in this process: retry, backing off
            time.sleep(min(0.05 * 2 ** failures, 2.0))

    def _restart_local(self, failures: int) -> None:
        code = self._local.exited()
        if code is None and failures < 3:  # alive but slow: give it two more timeouts
            return
        self.get_logger().error(f"inference server {'exited with ' + str(code) if code is not None else 'hung'}: "
                                "restarting")
        for attempt in range(len(self._local.backoff_s)):
            try:
                client = self._local.restart(attempt, keep_going=lambda: self._running)
            except (RuntimeError, TimeoutError) as e:
                with self.lock:
                    self.fault = f"inference: server restart {attempt + 1} failed: {e}"
                if not self._running:
                    return
                continue
            old, self.policy = self.policy, client
            old.close()
            return
        with self.lock:
            self.fault = f"inference: server down, {len(self._local.backoff_s)} restarts failed; holding"
        self.get_logger().error(self.fault)
        while self._running:  # nothing more to try: hold until the node is stopped
            time.sleep(0.5)

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
                state = "estop"
            elif not self._fresh(now):
                state = "stale" if self.joints is not None else "waiting"
            elif self.fault is not None:
                state = "fault"
            else:
                target = self.player.command(now)
                state = "ok" if target is not None else "waiting"
            if state == "ok":
                cmd = self.safety.filter(target)
            else:
                if state == "stale" and self.player.chunk is not None:
                    self._discard_plan()  # what was planned before the dropout is not played after it
                cmd = self.safety.hold()
            self.safety_state = state
            pending, self._pending_latency = self._pending_latency, None
            if cmd is None:
                return
            # published under the lock: a `~/reset` or an e-stop from another thread lands before
            # this command or after it is out, never between its computation and its publication
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
        with self.lock:
            inputs = {s: self.input_problems.get(s, "ok")
                      for s in [f"image_{c}" for c in self.cameras] + ["joint_state"]}
            return {
                "safety": self.safety_state, "estop": self.estop, "fault": self.fault, "inputs": inputs,
                "commands": self.commands,
                "infer_ms_p50": _pct(self.infer_ms, 50), "infer_ms_p99": _pct(self.infer_ms, 99),
                "latency_ms_p50": _pct(self.latency_ms, 50), "latency_ms_p99": _pct(self.latency_ms, 99),
                "jitter_ms_p50": _pct(self.jitter_ms, 50), "jitter_ms_p99": _pct(self.jitter_ms, 99),
                "dropped_periods": self.dropped, "chunk_age_s": min(self.player.age(now), 1e9),
                "clamped": self.safety.clamped, "rejected": dict(self.rejected),
                "server_restarts": self._local.restarts if self._local is not None else 0,
                "limit_hits": dict(zip(self.joint_names, self.safety.limit_hits.tolist())),
                "rate_hits": dict(zip(self.joint_names, self.safety.rate_hits.tolist())),
            }

    def diagnostics(self, status: dict) -> DiagnosticArray:
        """The status as one DiagnosticStatus (rqt_robot_monitor, diagnostic_aggregator)."""
        state = status["safety"]
        problems = {k: v for k, v in status["inputs"].items() if v != "ok"}
        message = state if not (status["fault"] or problems) else \
            f"{state}: {status['fault'] or '; '.join(f'{k}: {v}' for k, v in problems.items())}"
        values = [KeyValue(key=k, value=v if isinstance(v, str) else json.dumps(v)) for k, v in status.items()]
        diag = DiagnosticStatus(level=LEVELS[state], name=f"{self.get_name()}: policy", message=message[:500],
                                hardware_id=self.get_name(), values=values)
        msg = DiagnosticArray(status=[diag])
        msg.header.stamp = self.get_clock().now().to_msg()
        return msg

    def _publish_status(self) -> None:
        status = self.status()
        self.status_pub.publish(String(data=json.dumps(status)))
        self.diag_pub.publish(self.diagnostics(status))

    def destroy_node(self):
        if not hasattr(self, "_infer_thread"):  # __init__ failed before starting it (bad parameters)
            if getattr(self, "_local", None) is not None:
                self._local.stop()
            return super().destroy_node()
        self._running = False
        with self.lock:
            self._new_obs.notify_all()
        self._infer_thread.join(5)
        if self._local is not None:
            self._local.stop()
        return super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """`vla node` / `vla-policy-node`: the policy node alone, for a real arm. Takes ROS arguments as
    `ros2 run` passes them: --ros-args --params-file configs/policy_node.yaml -p policy:=DIR ..."""
    rclpy.init(args=sys.argv if args is None else ["vla-policy-node", *args])
    try:
        node = PolicyNode()
    except (ValueError, RuntimeError, TimeoutError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()  # every callback is sub-millisecond; the model runs elsewhere
    executor.add_node(node)
    node.get_logger().info(f"driving {node.joint_names} at {1 / node.period:.0f} Hz; cameras {node.cameras}")
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def cmd_node(args) -> int:
    """`vla node`: everything after `node` on the command line goes to ROS."""
    return main(args.ros_args)


if __name__ == "__main__":
    sys.exit(main())
