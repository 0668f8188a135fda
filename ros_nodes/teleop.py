"""A teleoperation stand-in: the scripted expert drives the sim robot over ROS2, as a person with a
leader arm would drive a real one.

It answers every joint state the sim robot publishes with the expert's next command, as a
JointTrajectory on the command topic stamped with that joint state's stamp (the reading it answers). The expert plans from the
simulation's true scene (a person sees the table), read from the sim robot node in this process;
what reaches the robot goes only through the topic. `vla teleop` runs the two nodes, the robot side
of `vla record`.
"""

from __future__ import annotations

import json
import os
import sys
import time

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import JointState
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from vla.ros_nodes.contract import stamp_s
from vla.ros_nodes.policy_node import COMMAND_QOS
from vla.ros_nodes.sim_node import SimRobotNode
from vla.sim import resolve_tasks
from vla.sim.experts import ScriptedExpert


class TeleopNode(Node):
    def __init__(self, command_topic: str = "/command", node_name: str = "vla_teleop"):
        """Made before the sim robot (so it hears the robot's first state), then `attach`ed to it."""
        super().__init__(node_name)
        self.sim: SimRobotNode | None = None
        self.episode = None  # (seed, episodes finished) of the episode the expert plans for
        self.commands = 0
        self.pub = self.create_publisher(JointTrajectory, command_topic, COMMAND_QOS)
        self.create_subscription(JointState, "/joint_states", self._on_joints, qos_profile_sensor_data)

    def attach(self, sim: SimRobotNode) -> None:
        self.sim, self.expert, self.episode = sim, ScriptedExpert(sim.env), None

    def _on_joints(self, msg: JointState) -> None:
        if self.sim is None or self.sim.done or stamp_s(msg) < self.sim.episode_stamp:
            return  # the last episode's final state: the sim has reset since
        episode = (self.sim.seed, len(self.sim.results))
        if episode != self.episode:
            self.episode = episode
            self.expert.reset()
        q = self.expert.act()
        traj = JointTrajectory(joint_names=list(self.sim.joint_names),
                               points=[JointTrajectoryPoint(positions=[float(x) for x in q])])
        traj.header.stamp = msg.header.stamp  # the observation it answers, as a leader arm's bridge stamps its reading
        self.pub.publish(traj)
        self.commands += 1


def teleop(tasks: list[str], episodes: int, seed: int = 0, image_size: int = 96, cameras=("front", "wrist"),
           timeout_s: float = 3600.0, extra_nodes=(), progress: bool = True, speed: float = 1.0) -> list[dict]:
    """Each task's `episodes` expert episodes from `seed`, through ROS2 (rclpy must be initialized);
    `extra_nodes` (a recorder, a bag writer) spin beside them. -> the sim's episode results."""
    results = []
    for task in tasks:
        op = TeleopNode()
        sim = SimRobotNode(task, seed=seed, episodes=episodes, image_size=image_size, cameras=cameras,
                           node_name="vla_sim_robot", speed=speed)
        op.attach(sim)
        executor = SingleThreadedExecutor()
        for node in (sim, op, *extra_nodes):
            executor.add_node(node)
        t_end = time.monotonic() + timeout_s
        while not sim.done and time.monotonic() < t_end:
            executor.spin_once(timeout_sec=0.1)
        t_drain = time.monotonic() + 0.5  # the last marker and commands reach the recorders
        while time.monotonic() < t_drain:
            executor.spin_once(timeout_sec=0.05)
        if progress:
            print(f"{task:16s} {sum(r['success'] for r in sim.results)}/{len(sim.results)} expert success", flush=True)
        results.extend(sim.results)
        for node in (sim, op, *extra_nodes):
            executor.remove_node(node)
        executor.shutdown()
        op.destroy_node()
        sim.destroy_node()
    return results


def cmd_teleop(args) -> int:
    try:
        tasks = resolve_tasks(args.tasks)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.domain_id is not None:
        os.environ["ROS_DOMAIN_ID"] = str(args.domain_id)
    rclpy.init()
    try:
        results = teleop(tasks, args.episodes, seed=args.seed, image_size=args.image_size,
                         cameras=tuple(args.cameras.split(",")), speed=args.speed)
    except (KeyboardInterrupt, ExternalShutdownException):
        results = []
    finally:
        rclpy.try_shutdown()
    print(json.dumps({"episodes": len(results), "success": sum(r["success"] for r in results)}))
    return 0
