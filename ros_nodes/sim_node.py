"""A `sim/` task exposed as a ROS2 robot: it runs in real time like a robot driver.

Every control period of the sim (0.1 s) it applies the latest command (JointTrajectory or
Float64MultiArray, as the policy node sends them), steps the physics, and publishes one
sensor_msgs/Image per camera (rgb8) and the sensor_msgs/JointState, stamped with the time of
the frame. The instruction goes out latched on a String topic at every episode start; when an
episode starts, `~/episode` says so ({"event": "start", "stamp": its first observation's}); when it
ends (success or time limit), a JSON report there ({"event": "end", "success": ..., "stamp": its last
observation's}) marks the end for a recorder, and the next seed starts.

An episode start teleports the arm to the new layout's start pose, which no real arm does: so the
sim calls the policy node's `~/reset` service first (as an operator would after homing an arm),
holds the physics until it is answered, and ignores commands stamped before the answer.
"""

from __future__ import annotations

import array
import json

import numpy as np
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from vla.ros_nodes.contract import stamp_s
from vla.ros_nodes.policy_node import COMMAND_QOS, DEFAULT_JOINTS, LATCHED_QOS
from vla.sim import EVAL_SEED_START, make_env
from vla.sim.env import CONTROL_HZ


class SimRobotNode(Node):
    def __init__(self, task: str = "pick_cube", seed: int = EVAL_SEED_START, episodes: int = 1, image_size: int = 96,
                 cameras=("front", "wrist"), image_topic_prefix: str = "/camera", command_topic: str = "/command",
                 command_type: str = "trajectory", joint_names=DEFAULT_JOINTS, instruction_topic: str = "/instruction",
                 policy_reset_service: str = "/vla_policy/reset", node_name: str = "vla_sim_robot",
                 speed: float = 1.0):
        """speed: control periods per 0.1 s of wall time (above 1: faster than real time, for
        recording demonstrations whose frames are clocked by the camera's messages)."""
        super().__init__(node_name)

        self.env = make_env(task, image_size=image_size, cameras=tuple(cameras))
        self.cameras, self.joint_names = list(cameras), list(joint_names)
        self.command: np.ndarray | None = None
        self.rejected = 0
        self.image_pubs = {c: self.create_publisher(Image, f"{image_topic_prefix}/{c}/image_raw", qos_profile_sensor_data)
                           for c in self.cameras}
        self.joint_pub = self.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
        self.instruction_pub = self.create_publisher(String, instruction_topic, LATCHED_QOS)
        self.episode_pub = self.create_publisher(String, "~/episode", COMMAND_QOS)
        if command_type == "trajectory":
            self.create_subscription(JointTrajectory, command_topic, self._on_trajectory, COMMAND_QOS)
        else:
            self.create_subscription(Float64MultiArray, command_topic, self._on_array, COMMAND_QOS)
        self.policy_reset = self.create_client(Trigger, policy_reset_service)
        self.policy_reset.wait_for_service(timeout_sec=2.0)  # discovery; no policy node: no reset calls
        self._resetting = None  # (the policy node's answer to `~/reset`, when it was asked), while awaited
        self._accept_after = None  # commands stamped before this (ROS time) belong to the last episode
        self.frame_stamp = 0.0  # the stamp (s) of the observation published last
        self.episode_stamp = 0.0  # the stamp of the episode's first observation
        self.begin(seed, episodes)
        if not speed > 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.timer = self.create_timer(1.0 / (CONTROL_HZ * speed), self._tick)

    def begin(self, seed: int, episodes: int) -> None:
        """Run `episodes` more episodes from `seed` (the same node and env, as a robot driver stays up)."""
        self.seed, self.episodes_left = seed, episodes
        self.results: list[dict] = []
        self.done = False
        self._start_episode()

    def _start_episode(self) -> None:
        self.obs, _ = self.env.reset(seed=self.seed)
        self.command = None
        if self.policy_reset.service_is_ready():
            self._resetting = (self.policy_reset.call_async(Trigger.Request()), self.get_clock().now())
        self.instruction_pub.publish(String(data=self.env.instruction))
        self._publish(self.obs)
        self.episode_stamp = self.frame_stamp
        self.episode_pub.publish(String(data=json.dumps({"event": "start", "seed": self.seed,
                                                         "stamp": self.episode_stamp})))

    def _set_command(self, values, stamp=None) -> None:
        if self._resetting is not None or (stamp is not None and self._accept_after is not None
                                           and stamp < self._accept_after):
            return  # planned for the pose before the episode reset
        cmd = np.asarray(values, dtype=np.float64)
        if cmd.shape != (len(self.joint_names),) or not np.all(np.isfinite(cmd)):
            self.rejected += 1
            return
        self.command = cmd

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        if not msg.points or list(msg.joint_names) != self.joint_names:
            self.rejected += 1
            return
        self._set_command(msg.points[0].positions, stamp_s(msg))

    def _on_array(self, msg: Float64MultiArray) -> None:
        self._set_command(msg.data)

    def _publish(self, obs: dict) -> None:
        now = self.get_clock().now()
        stamp, self.frame_stamp = now.to_msg(), now.nanoseconds * 1e-9
        for cam, pub in self.image_pubs.items():
            img = obs[f"observation.images.{cam}"]
            msg = Image(height=img.shape[0], width=img.shape[1], encoding="rgb8", step=img.shape[1] * 3,
                        data=array.array("B", img.tobytes()))  # array.array: no per-byte checks in rclpy
            msg.header.stamp, msg.header.frame_id = stamp, cam
            pub.publish(msg)
        js = JointState(name=self.joint_names, position=[float(x) for x in obs["observation.state"]])
        js.header.stamp = stamp
        self.joint_pub.publish(js)

    def _tick(self) -> None:
        if self.done:
            return
        if self._resetting is not None:  # the policy node has not taken the new pose yet: wait, keep sensing
            answer, asked = self._resetting
            if not answer.done() and (self.get_clock().now() - asked).nanoseconds < 2e9:  # gone: go on after 2 s
                return self._publish(self.obs)
            self._resetting = None
            self._accept_after = self.get_clock().now().nanoseconds * 1e-9
        action = self.command if self.command is not None else self.obs["observation.state"]
        self.obs, _, terminated, truncated, info = self.env.step(np.asarray(action, dtype=np.float32))
        self._publish(self.obs)
        if terminated or truncated:
            result = {"event": "end", "task": self.env.task.name, "seed": self.seed, "success": bool(info["success"]),
                      "steps": self.env.steps, "instruction": self.env.instruction, "stamp": self.frame_stamp}
            self.results.append(result)
            self.episode_pub.publish(String(data=json.dumps(result)))
            self.episodes_left -= 1
            self.seed += 1
            if self.episodes_left <= 0:
                self.done = True
            else:
                self._start_episode()

    def destroy_node(self):
        self.env.close()
        return super().destroy_node()
