"""rosbag2 files (sqlite3 or MCAP) -> a LeRobotDataset v3 (`vla import-bag`), and a bag writer node.

Bags are read with `rosbags` (Apache-2.0, pure Python: no ROS install needed), messages in the
order the bag stores them (its receive timestamps, as `ros2 bag record` writes them), into the
same `Recording` the live recorder feeds, so a bag and a live recording of one run give the same
frames. Episodes: one per bag (`split="bag"`), or between the start and end markers on the
contract's `episodes.marker_topic` (`split="marker"`). Every bag is checked against the contract before anything is written (each
topic present with the contract's type), the dataset is written under a temporary directory and
renamed into place only when every bag imported: a bad bag leaves nothing behind.

`BagWriterNode` records the contract's topics (serialized, untouched) into a rosbag2 with
`rosbags`' writer, as `ros2 bag record` would; the closed-loop test uses it beside `vla record`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from vla.ros_nodes.contract import STRING, Contract, ContractError, load_contract
from vla.ros_nodes.recording import Recording

STORAGES = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
SPLITS = ("bag", "marker")


def typestore():
    return get_typestore(Stores.LATEST)


def contract_topics(contract: Contract) -> dict[str, str]:
    """topic -> message type, for every topic the contract reads."""
    topics = {s.topic: s.msgtype for s in contract.streams.values()}
    for topic in (contract.instruction_topic, contract.marker_topic):
        if topic:
            topics[topic] = STRING
    return topics


def _check_bag(path: Path, contract: Contract, split: str) -> None:
    """ContractError naming the bag and the topic when the bag cannot give the contract's features."""
    try:
        with Reader(path) as reader:
            have = {c.topic: c.msgtype for c in reader.connections}
    except Exception as e:  # not a bag, a truncated one: rosbags and sqlite raise many kinds
        raise ContractError(f"bag {path}: cannot be read ({type(e).__name__}: {e})") from None
    need = {s.topic: s.msgtype for s in contract.streams.values()}
    if split == "marker":
        if not contract.marker_topic:
            raise ContractError(f"split by marker needs the contract's episodes.marker_topic ({contract.source})")
        need[contract.marker_topic] = STRING
    for topic, msgtype in need.items():
        if topic not in have:
            raise ContractError(f"bag {path}: no topic {topic} (the contract's; the bag has {sorted(have)})")
        if have[topic] != msgtype:
            raise ContractError(f"bag {path}: topic {topic} is {have[topic]}, the contract says {msgtype}")
    if contract.instruction_topic and contract.instruction_topic in have and have[contract.instruction_topic] != STRING:
        raise ContractError(f"bag {path}: topic {contract.instruction_topic} is {have[contract.instruction_topic]}, "
                            f"the contract says {STRING}")


def import_bags(bags: list[str | Path], contract: Contract, out: str | Path, split: str = "bag",
                task: str | None = None, video: bool = True) -> dict:
    """Every bag into one new dataset at `out`; -> a report (episodes, frames, dropped, frames/s, MB/s)."""
    if split not in SPLITS:
        raise ContractError(f"split must be one of {list(SPLITS)}, got {split!r}")
    bags = [Path(b) for b in bags]
    if not bags:
        raise ContractError("no bag given")
    out = Path(out)
    if out.exists():
        raise ContractError(f"{out} exists: import-bag writes a new dataset (choose another --out)")
    for bag in bags:
        _check_bag(bag, contract, split)
    tmp = out.with_name(f".{out.name}.importing")
    shutil.rmtree(tmp, ignore_errors=True)
    store = typestore()
    by_topic: dict[str, list[str]] = {}
    for key, s in contract.streams.items():
        by_topic.setdefault(s.topic, []).append(key)
    t0, size, messages = time.perf_counter(), 0, 0
    try:
        recording = Recording(contract, tmp, task=task, video=video)
        for bag in bags:
            size += sum(f.stat().st_size for f in bag.rglob("*") if f.is_file())
            recording.restart()  # a bag is a recording of its own: its own clock, its own episodes
            if split == "bag":
                recording.start(float("-inf"))
            last_s = None
            try:
                with Reader(bag) as reader:
                    wanted = [c for c in reader.connections if c.topic in by_topic
                              or c.topic in (contract.instruction_topic, contract.marker_topic)]
                    for conn, stamp_ns, raw in reader.messages(connections=wanted):
                        now = stamp_ns * 1e-9
                        last_s = now if last_s is None else max(last_s, now)
                        msg = store.deserialize_cdr(raw, conn.msgtype)
                        messages += 1
                        if conn.topic in by_topic:
                            for key in by_topic[conn.topic]:
                                try:
                                    recording.on_message(key, msg, now, strict=True)
                                except ContractError as e:
                                    raise ContractError(f"bag {bag}: topic {conn.topic}: {e}") from None
                        if conn.topic == contract.instruction_topic:
                            recording.on_instruction(msg.data)
                        if split == "marker" and conn.topic == contract.marker_topic:
                            recording.on_marker(msg.data, now)
                        else:
                            recording.poll(now)
            except ContractError:
                raise
            except Exception as e:  # a truncated or corrupt file: rosbags, sqlite and the CDR decoder raise many kinds
                raise ContractError(f"bag {bag}: cannot be read to the end ({type(e).__name__}: {e})") from None
            recording.poll(None)
            if split == "bag" and last_s is not None:
                recording.end_episode(float("inf"))
        recording.close()
        if recording.writer.num_episodes == 0:
            raise ContractError(f"no episode in {[str(b) for b in bags]}: no frame had every stream fresh "
                                f"(dropped per stream: {recording.report()['stale']})")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    report = recording.report()
    report.update(bags=len(bags), messages=messages, seconds=seconds, bag_mb=size / 1e6,
                  frames_per_s=report.get("frames", 0) / seconds, mb_per_s=size / 1e6 / seconds)
    return report


def cmd_import_bag(args) -> int:
    try:
        contract = load_contract(args.contract)
        report = import_bags(args.bags, contract, args.out, split=args.split, task=args.task)
    except (ContractError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


class BagWriterNode:
    """The contract's topics, serialized as they arrive, into a new rosbag2 (sqlite3 or MCAP),
    stamped with their receive time as `ros2 bag record` does. A plain rclpy node (made in
    `create`), imported only where rclpy is."""

    @staticmethod
    def create(contract: Contract, path: str | Path, storage: str = "mcap", node_name: str = "vla_bag_writer"):
        from rclpy.node import Node  # optional: import-bag runs without rclpy

        from vla.ros_nodes.policy_node import MESSAGE_CLASSES  # optional: rclpy
        from vla.ros_nodes.recorder import subscription_qos  # optional: rclpy

        if storage not in STORAGES:
            raise ContractError(f"storage must be one of {list(STORAGES)}, got {storage!r}")

        class _Node(Node):
            def __init__(self):
                super().__init__(node_name)
                store = typestore()
                self.writer = Writer(Path(path), version=Writer.VERSION_LATEST, storage_plugin=STORAGES[storage])
                self.writer.open()
                self.counts = {}
                for topic, msgtype in contract_topics(contract).items():
                    conn = self.writer.add_connection(topic, msgtype, typestore=store)
                    self.create_subscription(MESSAGE_CLASSES[msgtype], topic, lambda raw, c=conn: self._write(c, raw),
                                             subscription_qos(contract, topic), raw=True)

            def _write(self, conn, raw: bytes) -> None:
                self.writer.write(conn, self.get_clock().now().nanoseconds, raw)
                self.counts[conn.topic] = self.counts.get(conn.topic, 0) + 1

            def destroy_node(self):
                self.writer.close()
                return super().destroy_node()

        return _Node()
