"""`vla record`: a recorder node that writes a robot's ROS2 topics as a LeRobotDataset v3, live.

It subscribes to the topic contract's streams (ros_nodes/contract.py), aligns them to the
contract's frame rate and writes episode by episode (ros_nodes/recording.py): each finished
episode is committed before the next begins, so a crash loses at most the episode in progress.

Episodes start and stop by service (std_srvs/Trigger `~/start`, `~/stop`, and `~/discard` to drop
the one in progress when the operator says it failed), or by the start and end markers on the
contract's marker topic (the sim robot's `~/episode`). The task prompt is the
latest message on the contract's instruction topic, or `task` (`--task`). Progress goes out as
JSON on `~/status`: episodes and frames written, frames dropped per stale stream, refused and late
messages.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy
from std_msgs.msg import String
from std_srvs.srv import Trigger

from vla.ros_nodes.contract import Contract, ContractError, load_contract
from vla.ros_nodes.policy_node import COMMAND_QOS, LATCHED_QOS, MESSAGE_CLASSES
from vla.ros_nodes.recording import Recording

# best effort (matches a reliable publisher too) with room for a burst: a recorder must not drop
# what a slow callback would
RECORD_QOS = QoSProfile(depth=200, reliability=QoSReliabilityPolicy.BEST_EFFORT, history=QoSHistoryPolicy.KEEP_LAST)


def subscription_qos(contract: Contract, topic: str) -> QoSProfile:
    if topic == contract.instruction_topic:
        return LATCHED_QOS  # the instruction is latched: a late subscriber still gets it
    if topic == contract.marker_topic:
        return COMMAND_QOS
    return RECORD_QOS


class RecorderNode(Node):
    def __init__(self, contract: Contract, out: str, task: str | None = None, episodes: int | None = None,
                 start_now: bool = False, video: bool = True, node_name: str = "vla_recorder"):
        """episodes: stop after that many are written. start_now: an episode starts now (else at a
        start marker or call).
        video: cameras as mp4 (else PNG in the parquet, lossless)."""
        super().__init__(node_name)
        self.contract = contract
        self.recording = Recording(contract, out, task=task, video=video)
        self.episodes_wanted = episodes
        self.by_call = False  # the episode in progress was begun by a start call (or start_now), not a marker
        self.written: list[dict] = []
        self.done = False
        for key, s in contract.streams.items():
            self.create_subscription(MESSAGE_CLASSES[s.msgtype], s.topic,
                                     lambda m, k=key: self.recording.on_message(k, m, self.now()),
                                     subscription_qos(contract, s.topic))
        if contract.instruction_topic:
            self.create_subscription(String, contract.instruction_topic,
                                     lambda m: self.recording.on_instruction(m.data), LATCHED_QOS)
        if contract.marker_topic:
            self.create_subscription(String, contract.marker_topic, self._on_marker, COMMAND_QOS)
        self.create_service(Trigger, "~/start", self._on_start)
        self.create_service(Trigger, "~/stop", self._on_stop)
        self.create_service(Trigger, "~/discard", self._on_discard)
        self.status_pub = self.create_publisher(String, "~/status", COMMAND_QOS)
        self.create_timer(0.5 / contract.fps, self._poll)
        self.create_timer(1.0, self._publish_status)
        if start_now:
            self.recording.start(self.now())
            self.by_call = True

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _poll(self) -> None:
        self.recording.poll(self.now())

    def _written(self, summary: dict | None) -> None:
        if summary is None:
            return
        self.written.append(summary)
        self.get_logger().info(f"episode {summary['episode_index']}: {summary['frames']} frames, {summary['task']!r}")
        if self.episodes_wanted is not None and len(self.written) >= self.episodes_wanted:
            self.done = True

    def _on_marker(self, msg: String) -> None:
        if not self.done:
            self.by_call = False
            self._written(self.recording.on_marker(msg.data, self.now()))

    def _on_start(self, request, response):
        self.recording.start(self.now())
        self.by_call = True
        response.success, response.message = True, "recording the next episode"
        return response

    def _on_stop(self, request, response):
        try:
            summary = self.recording.end_episode(self.now())
        except ContractError as e:
            response.success, response.message = False, str(e)
            return response
        self._written(summary)
        response.success = summary is not None
        response.message = (f"episode {summary['episode_index']}: {summary['frames']} frames" if summary
                            else "no frames recorded since the start")
        return response

    def _on_discard(self, request, response):
        dropped = self.recording.discard(self.now())
        response.success, response.message = True, f"discarded the episode in progress ({dropped} frames)"
        return response

    def finish(self) -> None:
        """A clean exit (Ctrl-C, --timeout): an episode begun by a start call ends and is written; one
        begun by a start marker never ended and is not."""
        self.recording.poll(None)
        if self.recording.active and self.by_call and not self.done:
            self._written(self.recording.end_episode(math.inf))

    def status(self) -> dict:
        return {"episodes": len(self.written), "recording": self.recording.active, **self.recording.report()}

    def _publish_status(self) -> None:
        self.status_pub.publish(String(data=json.dumps(self.status())))

    def destroy_node(self):
        self.recording.close()
        return super().destroy_node()


def cmd_record(args) -> int:
    """Record until --episodes are written, --timeout or Ctrl-C (every finished episode is kept, and
    one begun by --start-now or ~/start ends there)."""
    try:
        contract = load_contract(args.contract)
    except ContractError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.domain_id is not None:
        os.environ["ROS_DOMAIN_ID"] = str(args.domain_id)
    rclpy.init()
    try:
        node = RecorderNode(contract, args.out, task=args.task, episodes=args.episodes, start_now=args.start_now)
    except (ContractError, ValueError, OSError) as e:
        rclpy.shutdown()
        print(f"error: {e}", file=sys.stderr)
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    t_end = time.monotonic() + args.timeout if args.timeout else float("inf")
    try:
        while not node.done and time.monotonic() < t_end:
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.finish()
        print(json.dumps(node.status(), indent=2))
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
