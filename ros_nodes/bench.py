"""`vla bench-record`: what recording costs at a robot's rate, and how fast bags import.

A synthetic robot in this process publishes two cameras, the joint state and a command stream
(JointTrajectory) at `rate` Hz, stamped, while a bag writer node beside it records the same topics
to MCAP. `vla record` runs as its own process on a contract at that rate (a grid clock, latest
alignment), so its CPU is its own. Then the bag is imported with `vla import-bag`'s function.
Figures: the recorder's CPU (cores), frames written against the frames the rate gives, frames
dropped per stale stream, refused and late messages; import frames/s and MB/s of bag.
"""

from __future__ import annotations

import array
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rclpy
import yaml
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from vla.dataset import LeRobotDataset
from vla.ros_nodes.bags import BagWriterNode, import_bags
from vla.ros_nodes.contract import parse_contract
from vla.ros_nodes.policy_node import COMMAND_QOS

JOINTS = ["j1", "j2", "j3", "j4", "j5", "j6", "gripper"]


def bench_contract(rate: int, height: int, width: int) -> dict:
    cam = {"type": "sensor_msgs/msg/Image", "size": [height, width], "align": "latest", "max_age_s": 1.5 / rate}
    return {"fps": rate, "features": {
        "observation.images.front": {"topic": "/bench/front", **cam},
        "observation.images.wrist": {"topic": "/bench/wrist", **cam},
        "observation.state": {"topic": "/bench/joints", "type": "sensor_msgs/msg/JointState", "names": JOINTS,
                              "align": "latest", "max_age_s": 1.5 / rate},
        "action": {"topic": "/bench/command", "type": "trajectory_msgs/msg/JointTrajectory", "names": JOINTS,
                   "align": "latest", "max_age_s": 1.5 / rate}}}


class SyntheticRobot(Node):
    def __init__(self, rate: int, height: int, width: int):
        super().__init__("vla_bench_robot")
        self.h, self.w, self.published = height, width, 0
        self.rng = np.random.default_rng(0)
        self.frames = [self.rng.integers(0, 255, (height, width, 3), dtype=np.uint8).tobytes() for _ in range(8)]
        self.cams = [self.create_publisher(Image, f"/bench/{c}", qos_profile_sensor_data) for c in ("front", "wrist")]
        self.joints = self.create_publisher(JointState, "/bench/joints", qos_profile_sensor_data)
        self.command = self.create_publisher(JointTrajectory, "/bench/command", COMMAND_QOS)
        self.create_timer(1.0 / rate, self._tick)

    def _tick(self) -> None:
        stamp = self.get_clock().now().to_msg()
        data = array.array("B", self.frames[self.published % len(self.frames)])
        for pub in self.cams:
            msg = Image(height=self.h, width=self.w, encoding="rgb8", step=self.w * 3, data=data)
            msg.header.stamp = stamp
            pub.publish(msg)
        q = [float(np.sin(self.published / 50 + i)) for i in range(len(JOINTS))]
        js = JointState(name=JOINTS, position=q)
        js.header.stamp = stamp
        self.joints.publish(js)
        traj = JointTrajectory(joint_names=JOINTS, points=[JointTrajectoryPoint(positions=q)])
        traj.header.stamp = stamp
        self.command.publish(traj)
        self.published += 1


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_record(rate: int = 50, seconds: float = 20.0, height: int = 96, width: int = 96,
                 domain_id: int = 77) -> dict:
    work = Path(tempfile.mkdtemp(prefix="vla-bench-record-"))
    try:
        doc, contract_path = bench_contract(rate, height, width), work / "contract.yaml"
        contract_path.write_text(yaml.safe_dump(doc))
        contract = parse_contract(doc, str(contract_path))
        env = {**os.environ, "ROS_DOMAIN_ID": str(domain_id)}
        recorder = subprocess.Popen(
            [sys.executable, "-m", "vla.cli", "record", "--contract", str(contract_path), "--out", str(work / "ds"),
             "--task", "bench", "--start-now"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4.0)  # the recorder's start (imports, discovery)
        os.environ["ROS_DOMAIN_ID"] = str(domain_id)
        rclpy.init()
        try:
            robot = SyntheticRobot(rate, height, width)
            bag = BagWriterNode.create(contract, work / "bag", "mcap")
            executor = SingleThreadedExecutor()
            executor.add_node(robot)
            executor.add_node(bag)
            cpu0 = _cpu_s(recorder.pid)
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                executor.spin_once(timeout_sec=0.01)
            wall = time.monotonic() - t0
            cpu = _cpu_s(recorder.pid) - cpu0
            published = robot.published
            executor.shutdown()
            bag.destroy_node()
            robot.destroy_node()
        finally:
            rclpy.shutdown()
        time.sleep(1.5)  # the last frames' lag
        recorder.send_signal(signal.SIGINT)  # a clean stop: the episode begun by --start-now is written
        out, err = recorder.communicate(timeout=120)
        status = json.loads(out[out.index("{"):])
        written = LeRobotDataset(work / "ds").meta.info["total_frames"]
        imported = import_bags([work / "bag"], contract, work / "imported", task="bench")
        return {"rate_hz": rate, "camera": f"{width}x{height}", "seconds": round(wall, 1),
                "published_per_stream": published, "frames_written": written,
                "frames_expected": int(wall * rate), "dropped": status.get("stale", {}),
                "late": status.get("late", {}), "rejected": status.get("rejected", {}),
                "recorder_cpu_cores": round(cpu / wall, 3),
                "import": {"frames": imported.get("frames", 0), "frames_per_s": round(imported["frames_per_s"], 1),
                           "bag_mb": round(imported["bag_mb"], 1), "mb_per_s": round(imported["mb_per_s"], 1)}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cmd_bench_record(args) -> int:
    w, h = map(int, args.size.lower().split("x"))
    r = bench_record(rate=args.rate, seconds=args.seconds, height=h, width=w, domain_id=args.domain_id)
    print(json.dumps(r, indent=2))
    return 0
