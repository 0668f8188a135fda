"""The policy node's safety behaviour as real rclpy nodes on a private ROS_DOMAIN_ID, driven by a
scripted chunk source (the Policy interface a custom policy or a remote server implements), so each
fault is injected on purpose and every command the robot receives can be checked."""

import array
import json
import os
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from builtin_interfaces.msg import Time  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import Bool, String  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from vla.ros_nodes.policy_node import COMMAND_QOS, LATCHED_QOS, PolicyNode  # noqa: E402
from vla.spec import PolicySpec  # noqa: E402

NAMES = ["j1", "j2", "j3", "j4", "j5", "j6", "gripper"]
SIZE, H, A, FPS = 32, 16, 7, 10
MAX_STEP = 0.05


class ScriptedPolicy:
    """A chunk source whose chunks come from plan(obs, t_obs); records what it was given."""

    def __init__(self, plan):
        self.spec = PolicySpec(cameras=("front", "wrist"), image_size=SIZE, state_dim=A, action_dim=A, fps=FPS,
                               horizon=H, n_action_steps=8)
        self.plan, self.calls, self.resets, self.last_obs = plan, 0, 0, None
        self.delay = 0.0

    def reset(self, seed=None):
        self.resets += 1

    def act_chunk(self, obs):
        self.calls += 1
        self.last_obs = obs
        if self.delay:
            time.sleep(self.delay)
        return self.plan(obs)


def constant(values):
    return lambda obs: np.tile(np.asarray(values, float), (H, 1))


class Robot(Node):
    """Stands in for a robot driver: sensors out at 20 Hz, commands in; every knob a fault needs."""

    def __init__(self, clock_topic=False):
        super().__init__("test_robot")
        self.cams = {c: self.create_publisher(Image, f"/camera/{c}/image_raw", qos_profile_sensor_data)
                     for c in ("front", "wrist")}
        self.joints = self.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
        self.instruction = self.create_publisher(String, "/instruction", LATCHED_QOS)
        self.estop = self.create_publisher(Bool, "/vla/estop", COMMAND_QOS)
        self.estop_best_effort = self.create_publisher(
            Bool, "/vla/estop", QoSProfile(depth=10, reliability=QoSReliabilityPolicy.BEST_EFFORT))
        self.commands: list[tuple[float, np.ndarray]] = []  # (receipt time.monotonic(), positions)
        self.command_stamps: list[float] = []  # each command's header stamp (s, the node's clock)
        self.diagnostics: list[DiagnosticStatus] = []
        self.create_subscription(JointTrajectory, "/command", self._on_command, COMMAND_QOS)
        self.create_subscription(DiagnosticArray, "/diagnostics",
                                 lambda m: self.diagnostics.extend(m.status), COMMAND_QOS)
        self.sensing = True
        self.q = np.zeros(A)
        self.names = list(NAMES)
        self.stamp = None  # None: the node's clock now; else a callable -> seconds
        self.step_pad = 0  # bytes of padding per image row
        self.pixels = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
        self.create_timer(0.05, self.publish)

    def _on_command(self, msg):
        assert list(msg.joint_names) == NAMES
        self.commands.append((time.monotonic(), np.array(msg.points[0].positions)))
        self.command_stamps.append(msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9)

    def _stamp(self):
        if self.stamp is None:
            return self.get_clock().now().to_msg()
        t = self.stamp()
        return Time(sec=int(t), nanosec=int((t - int(t)) * 1e9))

    def publish(self):
        if not self.sensing:
            return
        stamp = self._stamp()
        row = SIZE * 3 + self.step_pad
        padded = np.zeros((SIZE, row), np.uint8)
        padded[:, : SIZE * 3] = self.pixels.reshape(SIZE, -1)
        for pub in self.cams.values():
            msg = Image(height=SIZE, width=SIZE, encoding="rgb8", step=row, data=array.array("B", padded.tobytes()))
            msg.header.stamp = stamp
            pub.publish(msg)
        js = JointState(name=self.names, position=[float(x) for x in self.q])
        js.header.stamp = stamp
        self.joints.publish(js)

    def commands_since(self, t):
        return [c for ts, c in self.commands if ts >= t]

    def times_since(self, t):
        return [ts for ts, _ in self.commands if ts >= t]

    def commands_stamped_after(self, t):
        """Commands the node published after its clock read t (receipt times lag behind: a command
        sent before an event can be taken off the queue after it)."""
        return [c for stamp, (_, c) in zip(self.command_stamps, self.commands) if stamp > t]


@pytest.fixture(scope="module")
def ros():
    os.environ["ROS_DOMAIN_ID"] = str(50 + os.getpid() % 50)
    rclpy.init()
    executor = SingleThreadedExecutor()
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    yield executor
    executor.shutdown()
    rclpy.shutdown()


@contextmanager
def graph(ros, policy, instruction="press the red button", **params):
    params = {"max_step": MAX_STEP, "watchdog_timeout": 0.3, "status_rate": 10.0, "replan_period": 0.2, **params}
    node = PolicyNode(policy=policy, **params)
    robot = Robot()
    ros.add_node(node)
    ros.add_node(robot)
    if instruction:
        robot.instruction.publish(String(data=instruction))
    try:
        yield node, robot
    finally:
        ros.remove_node(robot)
        ros.remove_node(node)
        node.destroy_node()
        robot.destroy_node()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def assert_smooth(cmds, times, period=0.02):
    cmds = np.array(cmds)
    assert np.all(np.isfinite(cmds))
    assert np.abs(np.diff(cmds, axis=0)).max() <= MAX_STEP + 1e-9, "a command jumped past max_step"
    assert np.diff(times).max() < 5 * period, "a control period published nothing"


def test_an_instruction_change_keeps_the_rate_limit_and_the_grip(ros):
    """A new instruction once reset the command to the measured position: a jump of 0.11-0.18 rad,
    a closed gripper commanded to its measured opening, and one period with no command."""
    plans = {"press the red button": [0.6, -0.4, 0.3, 0, 0, 0, 1.0], "open the drawer": [-0.2, 0.2, 0, 0, 0, 0, 1.0]}
    policy = ScriptedPolicy(lambda obs: constant(plans[obs["task"]])(obs))
    with graph(ros, policy) as (node, robot):
        robot.q = np.array([0, 0, 0, 0, 0, 0, 0.3])  # the arm does not follow: measured stays far from commanded
        assert wait_for(lambda: robot.commands and np.allclose(robot.commands[-1][1], plans["press the red button"]))
        t0 = time.monotonic()
        robot.instruction.publish(String(data="open the drawer"))
        assert wait_for(lambda: robot.commands and np.allclose(robot.commands[-1][1], plans["open the drawer"]))
        first = next(i for i, (ts, _) in enumerate(robot.commands) if ts >= t0)
        times, cmds = zip(*robot.commands[first - 1:])  # from the last command before the change
        assert_smooth(cmds, times)
        assert min(c[6] for c in cmds) == pytest.approx(1.0)  # the grip never loosened
        assert policy.resets >= 2  # the policy was reset for the new episode


def test_a_reset_starts_again_from_the_position_measured_after_it(ros):
    """`~/reset` is for a robot that was moved (homed, or a simulator's episode reset): unlike a new
    instruction, the node then moves from where the arm is, not from its last command."""
    from std_srvs.srv import Trigger

    policy = ScriptedPolicy(constant([0.5, 0, 0, 0, 0, 0, 1.0]))
    with graph(ros, policy) as (node, robot):
        assert wait_for(lambda: robot.commands and np.allclose(robot.commands[-1][1], [0.5, 0, 0, 0, 0, 0, 1.0]))
        robot.q = np.array([-0.4, 0.1, 0, 0, 0, 0, 0.0])  # moved by hand
        response = node._on_reset_service(Trigger.Request(), Trigger.Response())
        assert response.success
        t0, reset_at = time.monotonic(), node.now()
        assert wait_for(lambda: len(robot.commands_since(t0)) > 30)
        after = robot.commands_stamped_after(reset_at)
        np.testing.assert_allclose(after[0], [-0.4, 0.1, 0, 0, 0, 0, 0.0], atol=MAX_STEP + 1e-9)
        assert_smooth(after, robot.times_since(t0)[-len(after):])
        assert np.allclose(after[-1], [0.5, 0, 0, 0, 0, 0, 1.0])  # and on to the plan, rate-limited


def test_a_reset_between_a_commands_computation_and_its_publication_cannot_make_it_stale(ros):
    """The control step once published outside the node's lock: a `~/reset` (or an e-stop) from
    another thread, as a multi-threaded executor runs them, could land after a command was computed
    from the old position and before it went out, so the first command after the reset was from
    the plan it had just discarded. The fault is injected: the reset is started inside the publication."""
    from std_srvs.srv import Trigger

    policy = ScriptedPolicy(constant([0.5, 0, 0, 0, 0, 0, 1.0]))
    with graph(ros, policy) as (node, robot):
        assert wait_for(lambda: robot.commands and np.allclose(robot.commands[-1][1], [0.5, 0, 0, 0, 0, 0, 1.0]))
        publish, returned = node._publish_command, []

        def reset() -> None:
            robot.q = np.array([-0.4, 0.1, 0, 0, 0, 0, 0.0])
            node._on_reset_service(Trigger.Request(), Trigger.Response())
            returned.append(node.now())

        def publish_with_a_reset_in_between(cmd):
            node._publish_command = publish
            racer = threading.Thread(target=reset)
            racer.start()
            racer.join(timeout=0.3)  # with the lock held, the reset waits for this publication
            time.sleep(0.01)
            publish(cmd)

        node._publish_command = publish_with_a_reset_in_between
        assert wait_for(lambda: returned)
        t0 = time.monotonic()
        assert wait_for(lambda: len(robot.commands_since(t0)) > 10)
        after = robot.commands_stamped_after(returned[0])
        np.testing.assert_allclose(after[0], [-0.4, 0.1, 0, 0, 0, 0, 0.0], atol=MAX_STEP + 1e-9)


def test_an_estop_hold_does_not_move_on_a_new_instruction(ros):
    plans = {"press the red button": [0.5, 0, 0, 0, 0, 0, 1.0], "open the drawer": [-0.5, 0, 0, 0, 0, 0, 0.0]}
    policy = ScriptedPolicy(lambda obs: constant(plans[obs["task"]])(obs))
    with graph(ros, policy) as (node, robot):
        assert wait_for(lambda: robot.commands and np.allclose(robot.commands[-1][1], plans["press the red button"]))
        robot.estop.publish(Bool(data=True))
        assert wait_for(lambda: node.estop)
        t0 = time.monotonic()
        robot.instruction.publish(String(data="open the drawer"))
        time.sleep(0.8)
        held = robot.commands_since(t0)
        assert len(held) > 20 and all(np.array_equal(c, held[0]) for c in held)
        assert np.allclose(held[0], plans["press the red button"])


def test_leaving_a_watchdog_hold_starts_from_the_held_position(ros):
    """Fresh data after a dropout once replayed the end of the chunk planned before it (0.10 rad of
    j1 toward the old plan in 0.14 s) and blended the next chunk from there."""
    t_start = time.monotonic()
    state = {"after": False}

    def plan(obs):  # before the dropout: j1 moves up at 0.5 rad/s; after it: a plan that goes down
        if state["after"]:
            return constant([-0.3, 0, 0, 0, 0, 0, 0])(obs)
        t = time.monotonic() - t_start
        return np.array([[0.5 * (t + i / FPS), 0, 0, 0, 0, 0, 0] for i in range(H)])

    policy = ScriptedPolicy(plan)
    with graph(ros, policy) as (node, robot):
        assert wait_for(lambda: node.status()["safety"] == "ok")
        time.sleep(0.4)
        robot.sensing = False
        assert wait_for(lambda: node.status()["safety"] == "stale")
        time.sleep(0.2)
        held = node.safety.hold()[0]
        state["after"], policy.delay = True, 0.4  # the first plan after the dropout takes 0.4 s
        t0 = time.monotonic()
        robot.sensing = True
        assert wait_for(lambda: robot.commands and robot.commands[-1][1][0] < -0.29)
        after = [c[0] for c in robot.commands_since(t0)]
        assert max(after) <= held + 1e-9, f"j1 went to {max(after):.3f} past the held {held:.3f}"
        assert_smooth(robot.commands_since(t0), robot.times_since(t0))


@pytest.mark.parametrize("fault,problem", [
    ("frozen", "does not advance"), ("backwards", "does not advance"), ("old", "s old"), ("ahead", "ahead of"),
])
def test_frozen_backward_old_and_future_stamps_hold_and_are_reported(ros, fault, problem):
    policy = ScriptedPolicy(constant([0.3, 0, 0, 0, 0, 0, 0]))
    with graph(ros, policy) as (node, robot):
        assert wait_for(lambda: node.status()["safety"] == "ok")
        now = node.now()
        calls = iter(range(1, 10 ** 6))
        robot.stamp = {"frozen": lambda: now,
                       "backwards": lambda: now - 1e-3 * next(calls),  # 1 ms back per message
                       "old": lambda: node.now() - 3600,
                       "ahead": lambda: node.now() + 5}[fault]
        assert wait_for(lambda: node.status()["safety"] == "stale", timeout=3)
        status = node.status()
        assert problem in status["inputs"]["joint_state"] and problem in status["inputs"]["image_front"]
        assert status["rejected"]["stamp_image_front"] > 0
        t0 = time.monotonic()
        time.sleep(0.5)
        held = robot.commands_since(t0)
        assert held and all(np.array_equal(c, held[0]) for c in held)
        robot.stamp = None  # a sane driver again
        assert wait_for(lambda: node.status()["safety"] == "ok", timeout=5)
        assert node.status()["chunk_age_s"] < 2.0
        assert node.status()["inputs"]["joint_state"] == "ok"


def test_stamps_are_judged_by_the_simulation_clock_with_use_sim_time(ros):
    sim_t = {"t": 1000.0}
    clock_node = Node("test_clock")
    clock_pub = clock_node.create_publisher(Clock, "/clock", 10)

    def tick():
        sim_t["t"] += 0.005
        clock_pub.publish(Clock(clock=Time(sec=int(sim_t["t"]), nanosec=int((sim_t["t"] % 1) * 1e9))))

    clock_node.create_timer(0.005, tick)
    ros.add_node(clock_node)
    try:
        policy = ScriptedPolicy(constant([0.2, 0, 0, 0, 0, 0, 0]))
        with graph(ros, policy, use_sim_time=True) as (node, robot):
            robot.stamp = lambda: sim_t["t"]
            assert wait_for(lambda: node.status()["safety"] == "ok")
            assert abs(node.now() - sim_t["t"]) < 1.0
            robot.stamp = lambda: time.time()  # wall-clock stamps on a simulated clock: far ahead
            assert wait_for(lambda: node.status()["safety"] == "stale")
            assert "ahead of" in node.status()["inputs"]["joint_state"]
    finally:
        ros.remove_node(clock_node)
        clock_node.destroy_node()


def test_duplicate_joint_names_are_rejected_extra_joints_and_padded_rows_accepted(ros):
    policy = ScriptedPolicy(constant([0.1, 0, 0, 0, 0, 0, 0]))
    with graph(ros, policy) as (node, robot):
        robot.names = NAMES + ["conveyor", "j1"]  # a duplicate: the first value would win
        robot.q = np.array([0.0] * 7 + [5.0, np.nan])
        assert wait_for(lambda: "duplicate joint names ['j1']" in node.status()["inputs"]["joint_state"])
        assert node.status()["safety"] in ("stale", "waiting")
        robot.names, robot.q = NAMES + ["conveyor", "camera_tilt"], np.array([0.25] + [0.0] * 6 + [5.0, -1.0])
        robot.step_pad = 8  # rows padded to a multiple of 8 bytes, valid sensor_msgs/Image
        assert wait_for(lambda: node.status()["safety"] == "ok")
        assert wait_for(lambda: policy.last_obs is not None and policy.last_obs["observation.state"][0] == 0.25)
        np.testing.assert_array_equal(policy.last_obs["observation.images.front"], robot.pixels)
        np.testing.assert_array_equal(policy.last_obs["observation.state"], [0.25] + [0.0] * 6)
        assert node.status()["inputs"] == {"image_front": "ok", "image_wrist": "ok", "joint_state": "ok"}


@pytest.mark.parametrize("bad", [
    np.zeros((H - 1, A)), np.zeros(A) + 0.45, np.zeros(0), np.float64(0.3), np.full((H, A), np.nan),
    np.zeros((H, A + 1)), "a string", None,
], ids=["short", "1-D", "empty", "scalar", "nan", "wide", "string", "none"])
def test_malformed_chunks_are_counted_and_held_and_the_node_lives(ros, bad):
    """A malformed chunk once raised inside the control timer and ended the process; a 1-D chunk
    broadcast into every joint and moved them 0.42-0.50 rad."""
    good = [0.2, 0, 0, 0, 0, 0, 0]
    state = {"bad": False}
    policy = ScriptedPolicy(lambda obs: bad if state["bad"] else constant(good)(obs))
    with graph(ros, policy) as (node, robot):
        assert wait_for(lambda: robot.commands and np.allclose(robot.commands[-1][1], good))
        state["bad"] = True
        t0 = time.monotonic()
        assert wait_for(lambda: node.rejected["chunk"] >= 2)
        assert node.status()["safety"] == "fault" and "chunk" in node.status()["fault"]
        after = np.array(robot.commands_since(t0))
        assert len(after) > 5 and np.abs(after - np.array(good)).max() < 1e-9  # held, nothing moved
        state["bad"] = False
        assert wait_for(lambda: node.status()["safety"] == "ok")
        assert node._infer_thread.is_alive()


def test_a_raising_policy_is_reported_and_held(ros):
    state = {"fail": False}

    def plan(obs):
        if state["fail"]:
            raise RuntimeError("GPU fell off the bus")
        return constant([0.2, 0, 0, 0, 0, 0, 0])(obs)

    with graph(ros, ScriptedPolicy(plan)) as (node, robot):
        assert wait_for(lambda: node.status()["safety"] == "ok")
        state["fail"] = True
        assert wait_for(lambda: node.status()["safety"] == "fault")
        assert "GPU fell off the bus" in node.status()["fault"]
        state["fail"] = False
        assert wait_for(lambda: node.status()["safety"] == "ok")


def test_a_best_effort_estop_publisher_stops_the_arm_and_only_a_reset_releases_it(ros):
    policy = ScriptedPolicy(constant([0.3, 0, 0, 0, 0, 0, 0]))
    with graph(ros, policy) as (node, robot):
        assert wait_for(lambda: node.status()["safety"] == "ok")
        robot.estop_best_effort.publish(Bool(data=True))  # a joystick node's usual QoS
        assert wait_for(lambda: node.estop, timeout=3)
        robot.estop_best_effort.publish(Bool(data=False))  # the button let go: still stopped
        robot.estop.publish(Bool(data=False))
        time.sleep(0.5)
        assert node.estop and node.status()["safety"] == "estop"
        client = robot.create_client(SetBool, "/vla_policy/estop")
        assert client.wait_for_service(timeout_sec=5)

        def call(data):
            future = client.call_async(SetBool.Request(data=data))
            assert wait_for(future.done, 5)
            return future.result()

        robot.estop.publish(Bool(data=True))  # pressed again and held: a reset is refused
        assert wait_for(lambda: node._estop_asserted_at is not None)
        result = call(False)
        assert not result.success and "still asserted" in result.message and node.estop
        robot.estop.publish(Bool(data=False))
        assert wait_for(lambda: node._estop_asserted_at is None)
        assert call(False).success and not node.estop
        assert wait_for(lambda: node.status()["safety"] == "ok")
        robot.destroy_client(client)


def test_status_goes_out_on_diagnostics(ros):
    policy = ScriptedPolicy(constant([0.3, 0, 0, 0, 0, 0, 0]))
    with graph(ros, policy) as (node, robot):
        assert wait_for(lambda: any(d.level == DiagnosticStatus.OK for d in robot.diagnostics))
        ok = [d for d in robot.diagnostics if d.level == DiagnosticStatus.OK][-1]
        assert ok.name == "vla_policy: policy" and ok.message == "ok"
        values = {kv.key: kv.value for kv in ok.values}
        assert values["safety"] == "ok" and json.loads(values["commands"]) > 0
        robot.estop.publish(Bool(data=True))
        assert wait_for(lambda: any(d.level == DiagnosticStatus.ERROR and d.message.startswith("estop")
                                    for d in robot.diagnostics))
        robot.sensing = False
        robot.estop.publish(Bool(data=False))
        assert wait_for(lambda: node._estop_asserted_at is None)
        assert node._on_estop_service(SetBool.Request(data=False), SetBool.Response()).success
        assert wait_for(lambda: robot.diagnostics[-1].level == DiagnosticStatus.WARN
                        and robot.diagnostics[-1].message.startswith("stale"))


def test_fuzzed_messages_never_move_the_arm_past_its_limits(ros):
    """A seeded fuzzer over every message callback (images, joint states, instructions, e-stop):
    the node keeps running, and every command is finite, inside the limits and rate-limited."""
    rng = np.random.default_rng(7)
    policy = ScriptedPolicy(lambda obs: rng.normal(0, 3, (H, A)))  # wild plans, clamped by the filter
    lower, upper = [-1.0] * 6 + [0.0], [1.0] * 6 + [1.0]
    with graph(ros, policy, joint_lower=lower, joint_upper=upper) as (node, robot):
        assert wait_for(lambda: node.status()["safety"] == "ok")
        t0 = time.monotonic()
        encodings = ["rgb8", "bgr8", "mono8", "rgba8", "", "16UC1", "rgb8\x00"]
        names = NAMES + ["x", "", "j1 ", "\u00e9"]
        for i in range(600):
            kind = rng.integers(4)
            if kind == 0:
                h, w = (int(v) for v in rng.choice([0, 1, SIZE, SIZE + 1, 4096], 2))
                step = max(0, int(rng.choice([0, w * 3, w * 3 + 1, w * 3 - 1, 2 ** 31 - 1])))
                n = int(rng.choice([0, h * step, max(0, h * step - 1), 7])) if h * step < 10 ** 6 else 7
                msg = Image(height=h, width=w, encoding=str(rng.choice(encodings)), step=step,
                            data=array.array("B", rng.integers(0, 255, n, dtype=np.uint8).tobytes()))
                msg.header.stamp = robot._stamp() if rng.random() < 0.7 else Time(sec=int(rng.integers(0, 2 ** 31)))
                node._on_image(str(rng.choice(["front", "wrist"])), msg)
            elif kind == 1:
                k = int(rng.integers(0, 12))
                msg = JointState(name=[str(rng.choice(names)) for _ in range(k)],
                                 position=[float(v) for v in rng.choice([0.1, np.nan, np.inf, -1e308, 3.0], int(rng.integers(0, 12)))])
                msg.header.stamp = robot._stamp()
                node._on_joints(msg)
            elif kind == 2:
                node._on_instruction(String(data=str(rng.choice(["", "   ", "press the red button", "x" * 5000, "\x00"]))))
            else:
                node._on_estop_topic(Bool(data=bool(rng.random() < 0.05)))
                if node.estop and rng.random() < 0.5:
                    node._on_estop_service(SetBool.Request(data=False), SetBool.Response())
            if i % 20 == 0:
                time.sleep(0.01)
        time.sleep(0.3)
        cmds = np.array(robot.commands_since(t0))
        assert len(cmds) > 20 and np.all(np.isfinite(cmds))
        assert np.all(cmds >= np.array(lower) - 1e-9) and np.all(cmds <= np.array(upper) + 1e-9)
        assert np.abs(np.diff(cmds, axis=0)).max() <= MAX_STEP + 1e-9
        assert node._infer_thread.is_alive() and sum(node.rejected.values()) > 100
