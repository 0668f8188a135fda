"""The ROS2 policy node as real rclpy nodes on a private ROS_DOMAIN_ID: a test robot node publishes
camera images and joint states and listens to the commands. Rates are checked with wide margins."""

import array
import json
import os
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import Bool, String  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from vla.ros_nodes.policy_node import COMMAND_QOS, LATCHED_QOS, PolicyNode  # noqa: E402

NAMES = ["j1", "j2", "j3", "j4", "j5", "j6", "gripper"]
UPPER = [0.3, 1.9, 2.6, 2.9, 2.1, 2.9, 1.0]


class Robot(Node):
    """Stands in for a robot driver: sensors out, commands in."""

    def __init__(self, size):
        super().__init__("test_robot")
        self.size = size
        self.cams = {c: self.create_publisher(Image, f"/camera/{c}/image_raw", qos_profile_sensor_data)
                     for c in ("front", "wrist")}
        self.joints = self.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
        self.instruction = self.create_publisher(String, "/instruction", LATCHED_QOS)
        self.estop = self.create_publisher(Bool, "/vla/estop", COMMAND_QOS)
        self.commands: list[tuple[float, np.ndarray]] = []
        self.status: dict = {}
        self.create_subscription(JointTrajectory, "/command", self._on_command, COMMAND_QOS)
        self.create_subscription(String, "/vla/status", lambda m: setattr(self, "status", json.loads(m.data)),
                                 COMMAND_QOS)
        self.sensing = True
        self.rng = np.random.default_rng(0)
        self.q = np.zeros(7)
        self.create_timer(0.05, self._publish)

    def _on_command(self, msg):
        assert list(msg.joint_names) == NAMES
        self.commands.append((time.monotonic(), np.array(msg.points[0].positions)))

    def image(self, encoding="rgb8", size=None):
        s = size or self.size
        msg = Image(height=s, width=s, encoding=encoding, step=s * 3,
                    data=array.array("B", self.rng.integers(0, 255, s * s * 3, dtype=np.uint8).tobytes()))
        msg.header.stamp = self.get_clock().now().to_msg()
        return msg

    def joint_state(self, names=NAMES, q=None):
        msg = JointState(name=list(names), position=[float(x) for x in (self.q if q is None else q)])
        msg.header.stamp = self.get_clock().now().to_msg()
        return msg

    def _publish(self):
        if not self.sensing:
            return
        for pub in self.cams.values():
            pub.publish(self.image())
        self.joints.publish(self.joint_state())

    def commands_since(self, t):
        return [c for ts, c in self.commands if ts >= t]


def test_run_takes_an_artifact_directory_for_the_policy_parameter():
    """`vla run --policy DIR` puts DIR in the node's `policy` parameter, which shares its name with
    PolicyNode's policy argument (once a TypeError). No task: the node starts, loads DIR, stops.
    Runs before the module's `graph` fixture, since run() owns rclpy.init/shutdown."""
    from vla.cli import shipped_policy
    from vla.ros_nodes.run import run

    path = str(shipped_policy("nano_diffusion"))
    r = run([], params={"policy": path}, domain_id=150 + os.getpid() % 50, progress=False)
    assert r["policy"] == path and r["episodes"] == []
    with pytest.raises(ValueError, match="/nonexistent/artifact is not a policy artifact"):
        run([], params={"policy": "/nonexistent/artifact"}, domain_id=150 + os.getpid() % 50, progress=False)


@pytest.fixture(scope="module")
def graph():
    os.environ["ROS_DOMAIN_ID"] = str(100 + os.getpid() % 100)
    rclpy.init()
    node = PolicyNode(joint_upper=UPPER, max_step=0.05, watchdog_timeout=0.4, status_rate=10.0)
    robot = Robot(node.size)
    executor = SingleThreadedExecutor()  # callbacks are sub-ms; rclpy's multi-threaded executor adds jitter
    executor.add_node(node)
    executor.add_node(robot)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    robot.instruction.publish(String(data="press the red button"))
    deadline = time.monotonic() + 30
    while len(robot.commands) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    yield node, robot
    executor.shutdown()
    node.destroy_node()
    robot.destroy_node()
    rclpy.shutdown()


def test_commands_arrive_at_the_control_rate_within_limits(graph):
    node, robot = graph
    t0 = time.monotonic()
    time.sleep(2.0)
    cmds = robot.commands_since(t0)
    rate = len(cmds) / 2.0
    assert 25 <= rate <= 60, f"{rate:.1f} Hz for a 50 Hz node"
    arr = np.array(cmds)
    assert np.all(np.isfinite(arr)) and np.all(arr <= np.array(UPPER) + 1e-9)  # j1 clamped at 0.3
    assert np.all(np.abs(np.diff(arr, axis=0)) <= 0.05 + 1e-9)  # at most max_step per period
    assert robot.status["safety"] == "ok" and robot.status["infer_ms_p50"] > 0


def test_watchdog_holds_on_stale_input_and_resumes(graph):
    node, robot = graph
    robot.sensing = False
    time.sleep(0.8)  # past the 0.4 s watchdog
    t0 = time.monotonic()
    time.sleep(0.5)
    held = robot.commands_since(t0)
    assert held and all(np.array_equal(c, held[0]) for c in held)
    assert node.status()["safety"] == "stale"
    robot.sensing = True
    time.sleep(1.5)
    assert node.status()["safety"] == "ok"


def test_estop_latches_until_released_by_topic_and_service(graph):
    node, robot = graph
    robot.estop.publish(Bool(data=True))
    time.sleep(0.3)
    t0 = time.monotonic()
    time.sleep(0.6)  # fresh sensor data keeps coming: the stop must hold anyway
    held = robot.commands_since(t0)
    assert held and all(np.array_equal(c, held[0]) for c in held)
    assert node.status()["safety"] == "estop"
    robot.estop.publish(Bool(data=False))
    time.sleep(1.0)
    assert node.status()["safety"] == "ok"
    client = robot.create_client(SetBool, "/vla_policy/estop")
    assert client.wait_for_service(timeout_sec=5)
    future = client.call_async(SetBool.Request(data=True))
    deadline = time.monotonic() + 5
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert future.result().success and node.estop
    client.call_async(SetBool.Request(data=False))
    time.sleep(0.5)
    assert not node.estop


def test_malformed_messages_are_rejected_counted_and_the_node_runs_on(graph):
    node, robot = graph
    before = dict(node.rejected)
    robot.cams["front"].publish(robot.image(encoding="mono8"))
    robot.cams["front"].publish(robot.image(size=32))
    robot.joints.publish(robot.joint_state(q=[np.nan] * 7))
    robot.joints.publish(robot.joint_state(names=["a", "b", "c", "d", "e", "f", "g"]))
    time.sleep(0.5)
    assert node.rejected["image_front"] >= before.get("image_front", 0) + 2
    assert node.rejected["joint_state"] >= before.get("joint_state", 0) + 2
    t0 = time.monotonic()
    time.sleep(0.5)
    assert len(robot.commands_since(t0)) > 10
