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

from vla.policies import shipped_policy  # noqa: E402
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
    robot = Robot(node.policy.spec.image_size)
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


def test_estop_latches_until_reset_by_the_service(graph):
    node, robot = graph
    robot.estop.publish(Bool(data=True))
    time.sleep(0.3)
    t0 = time.monotonic()
    time.sleep(0.6)  # fresh sensor data keeps coming: the stop must hold anyway
    held = robot.commands_since(t0)
    assert held and all(np.array_equal(c, held[0]) for c in held)
    assert node.status()["safety"] == "estop"
    robot.estop.publish(Bool(data=False))  # the button let go: not a reset
    time.sleep(1.2)
    assert node.status()["safety"] == "estop"
    client = robot.create_client(SetBool, "/vla_policy/estop")
    assert client.wait_for_service(timeout_sec=5)
    future = client.call_async(SetBool.Request(data=False))
    deadline = time.monotonic() + 5
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert future.result().success and not node.estop
    time.sleep(1.0)
    assert node.status()["safety"] == "ok"
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
    robot.cams["front"].publish(robot.image(encoding="yuv422"))
    robot.cams["front"].publish(robot.image(size=32))
    robot.joints.publish(robot.joint_state(q=[np.nan] * 7))
    robot.joints.publish(robot.joint_state(names=["a", "b", "c", "d", "e", "f", "g"]))
    time.sleep(0.5)
    assert node.rejected["image_front"] >= before.get("image_front", 0) + 2
    assert node.rejected["joint_state"] >= before.get("joint_state", 0) + 2
    t0 = time.monotonic()
    time.sleep(0.5)
    assert len(robot.commands_since(t0)) > 10


def test_a_killed_inference_server_is_reported_and_restarted(graph):
    """Killing the server once stopped the arm with status "ok" and nothing restarted it."""
    node, robot = graph
    assert node.status()["safety"] == "ok"
    node._local.process.kill()
    deadline = time.monotonic() + 10
    while node.status()["safety"] != "fault" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.status()["safety"] == "fault" and "inference" in node.status()["fault"]
    t0 = time.monotonic()
    time.sleep(0.3)
    held = robot.commands_since(t0)
    assert held and all(np.array_equal(c, held[0]) for c in held)  # held while it is down
    deadline = time.monotonic() + 120
    while node.status()["safety"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node.status()["safety"] == "ok" and node.status()["server_restarts"] == 1
    assert node._local.exited() is None


def test_a_remote_server_that_goes_away_is_reconnected(graph):
    from vla.policies import Policy
    from vla.serving import PolicyServer

    node, robot = graph
    policy = Policy.from_pretrained(shipped_policy())

    def serve(address):
        srv = PolicyServer(policy, address)
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_ms": 20}, daemon=True)
        thread.start()
        return srv, thread

    srv, thread = serve("tcp://127.0.0.1:*")
    address = srv.address
    remote = PolicyNode(remote=address, joint_upper=UPPER, watchdog_timeout=0.4, command_topic="/command_remote",
                        status_topic="/vla/status_remote")
    remote_robot = Node("test_remote_listener")
    got = []
    remote_robot.create_subscription(JointTrajectory, "/command_remote", lambda m: got.append(time.monotonic()),
                                     COMMAND_QOS)
    executor = SingleThreadedExecutor()
    executor.add_node(remote)
    executor.add_node(remote_robot)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    try:
        deadline = time.monotonic() + 30
        while remote.status()["safety"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert remote.status()["safety"] == "ok"
        srv.stop()
        thread.join(2)
        srv.close()
        deadline = time.monotonic() + 15
        while remote.status()["safety"] != "fault" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert remote.status()["safety"] == "fault"
        srv, thread = serve(address)  # the server comes back on the same address
        deadline = time.monotonic() + 30
        while remote.status()["safety"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert remote.status()["safety"] == "ok"
        assert got and got[-1] > time.monotonic() - 1.0  # commands kept flowing throughout
    finally:
        executor.shutdown()
        remote.destroy_node()
        remote_robot.destroy_node()
        srv.stop()
        thread.join(2)
        srv.close()


def test_vla_node_runs_alone_from_a_ros_params_file(tmp_path):
    """`vla node` takes --ros-args --params-file as `ros2 run` does (the YAML was once unusable)."""
    import signal
    import subprocess
    import sys

    import yaml

    params = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "policy_node.yaml")))
    params["vla_policy"]["ros__parameters"].update(command_topic="/arm/command", control_rate=20.0)
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(params))
    env = dict(os.environ, ROS_DOMAIN_ID=str(200 + os.getpid() % 20))
    proc = subprocess.Popen([sys.executable, "-m", "vla.cli", "node", "--ros-args", "--params-file", str(path),
                             "-p", "joint_upper:=[0.3, 1.9, 2.6, 2.9, 2.1, 2.9, 1.0]"], env=env)
    code = subprocess.run([sys.executable, "-c", _LISTENER], env=env, capture_output=True, text=True, timeout=180)
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code.returncode == 0, code.stdout + code.stderr
    rate, j1_max = (float(x) for x in code.stdout.split())
    assert 12 <= rate <= 25 and j1_max <= 0.3 + 1e-9  # 20 Hz from the file, the -p limit applied


def test_vla_node_refuses_bad_parameters_with_one_error():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vla.cli", "node", "--ros-args", "-p", "joint_names:=[a, b]"],
                       capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, ROS_DOMAIN_ID=str(220 + os.getpid() % 10)))
    assert r.returncode == 2 and "error: joint_names has 2 names" in r.stderr


# A robot stand-in in its own process: sensors to /camera and /joint_states, listens on /arm/command.
_LISTENER = """
import array, time
import numpy as np
import rclpy
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory
from vla.ros_nodes.policy_node import COMMAND_QOS, LATCHED_QOS
rclpy.init()
n = Node("listener")
cams = [n.create_publisher(Image, f"/camera/{c}/image_raw", qos_profile_sensor_data) for c in ("front", "wrist")]
js = n.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
n.create_publisher(String, "/instruction", LATCHED_QOS).publish(String(data="press the red button"))
got = []
n.create_subscription(JointTrajectory, "/arm/command", lambda m: got.append((time.monotonic(), m.points[0].positions[0])), COMMAND_QOS)
rng = np.random.default_rng(0)
def pub():
    stamp = n.get_clock().now().to_msg()
    for p in cams:
        m = Image(height=96, width=96, encoding="rgb8", step=288, data=array.array("B", rng.integers(0, 255, 96 * 96 * 3, dtype=np.uint8).tobytes()))
        m.header.stamp = stamp
        p.publish(m)
    j = JointState(name=["j1", "j2", "j3", "j4", "j5", "j6", "gripper"], position=[0.0] * 7)
    j.header.stamp = stamp
    js.publish(j)
n.create_timer(0.05, pub)
deadline = time.monotonic() + 150
while len(got) < 40 and time.monotonic() < deadline:
    rclpy.spin_once(n, timeout_sec=0.05)
t0 = time.monotonic()
while time.monotonic() < t0 + 2.0:
    rclpy.spin_once(n, timeout_sec=0.05)
recent = [g for g in got if g[0] >= t0]
print(len(recent) / 2.0, max(g[1] for g in got))
"""
