"""Demonstrations from ROS2: the teleop stand-in drives the sim robot, `vla record` records it live
while two bag writers record the same run (sqlite3 and MCAP), and `vla import-bag` turns the bags
into datasets equal to the live one frame for frame; a recorder killed mid-episode leaves a
readable dataset; bad bags get one clear error naming the bag and topic, and leave nothing behind."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("rosbags")

from rosbags.rosbag2 import StoragePlugin, Writer  # noqa: E402

from vla.cli import main as vla_main  # noqa: E402
from vla.config import TrainConfig, VLAConfig  # noqa: E402
from vla.dataset import LeRobotDataset  # noqa: E402
from vla.jobs.train import Trainer  # noqa: E402
from vla.policies import shipped_policy  # noqa: E402
from vla.ros_nodes.bags import BagWriterNode, import_bags, typestore  # noqa: E402
from vla.ros_nodes.contract import ContractError, load_contract  # noqa: E402
from vla.ros_nodes.policy_node import PolicyNode  # noqa: E402
from vla.ros_nodes.recorder import RecorderNode  # noqa: E402
from vla.ros_nodes.run import run  # noqa: E402
from vla.ros_nodes.teleop import teleop  # noqa: E402
from vla.spec import PolicySpec  # noqa: E402

CONTRACT = Path(__file__).resolve().parents[1] / "configs" / "ros_contract_sim.yaml"
DOMAIN = 200 + os.getpid() % 30
JOINTS = ["j1", "j2", "j3", "j4", "j5", "j6", "gripper"]


def _frames(root: Path):
    """Every frame's state, action and both camera images, in order."""
    ds = LeRobotDataset(root, horizon=1)
    n = ds.meta.info["total_frames"]
    b = ds.batch(list(range(n)))
    return ([e["length"] for e in ds.meta.episodes], [list(e["tasks"]) for e in ds.meta.episodes], b)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two press_button demonstrations through ROS2, recorded live and by two bag writers."""
    root = tmp_path_factory.mktemp("rec")
    os.environ["ROS_DOMAIN_ID"] = str(DOMAIN)
    rclpy.init()
    contract = load_contract(CONTRACT)
    try:
        recorder = RecorderNode(contract, str(root / "live"), video=False)
        bags = [BagWriterNode.create(contract, root / "bag_sqlite3", "sqlite3", node_name="bag_sqlite3"),
                BagWriterNode.create(contract, root / "bag_mcap", "mcap", node_name="bag_mcap")]
        t0 = time.perf_counter()
        results = teleop(["press_button"], episodes=2, seed=3, extra_nodes=[recorder, *bags], progress=False)
        seconds = time.perf_counter() - t0
        status = recorder.status()
        for node in (recorder, *bags):
            node.destroy_node()
    finally:
        rclpy.shutdown()
    return {"root": root, "contract": contract, "results": results, "status": status, "seconds": seconds}


def test_the_teleop_stand_in_demonstrates_and_the_recorder_writes_each_episode(recorded):
    assert [r["success"] for r in recorded["results"]] == [True, True]
    lengths, tasks, b = _frames(recorded["root"] / "live")
    assert recorded["status"]["episodes"] == 2 and len(lengths) == 2
    # each episode: every observation the expert answered but the final one (which ends it)
    assert [n for n in lengths] == [r["steps"] for r in recorded["results"]]
    assert tasks == [[r["instruction"]] for r in recorded["results"]]
    assert recorded["status"]["rejected"] == {} and recorded["status"]["stale"] == {}
    assert b["observation.images.front"].shape[1:] == (96, 96, 3)
    # the action of a frame is the command that answered it: the arm moves towards it next frame
    state, action = b["observation.state"], b["action"][:, 0]
    first = lengths[0]
    assert np.abs(action[:first - 1] - state[1:first]).mean() < np.abs(action[1:first] - state[1:first]).mean()


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bags_of_the_same_run_import_equal_to_the_live_recording(recorded, storage, tmp_path):
    report = import_bags([recorded["root"] / f"bag_{storage}"], recorded["contract"], tmp_path / "ds",
                         split="marker", video=False)
    assert report["episodes"] == 2 and report["frames_per_s"] > 0
    live, bag = _frames(recorded["root"] / "live"), _frames(tmp_path / "ds")
    assert live[0] == bag[0] and live[1] == bag[1]
    for key in ("observation.state", "action", "observation.images.front", "observation.images.wrist"):
        np.testing.assert_array_equal(live[2][key], bag[2][key], err_msg=key)


def test_import_bag_on_the_command_line(recorded, tmp_path, capsys):
    rc = vla_main(["import-bag", str(recorded["root"] / "bag_mcap"), "--contract", str(CONTRACT), "--out",
                   str(tmp_path / "ds"), "--split", "marker"])
    assert rc == 0 and '"episodes": 2' in capsys.readouterr().out
    assert LeRobotDataset(tmp_path / "ds").meta.info["ros_contract"] == recorded["contract"].signature()
    rc = vla_main(["import-bag", str(recorded["root"] / "bag_mcap"), "--contract", str(CONTRACT), "--out",
                   str(tmp_path / "ds")])
    assert rc == 2 and "exists" in capsys.readouterr().err


# --- bad bags ---
def _write_bag(path: Path, storage="sqlite3", frames=6, skip_topic=None, wrong_type=None, backwards=False):
    """A small bag of the sim contract's topics, written with rosbags as `ros2 bag record` would."""
    store = typestore()
    T = store.types
    Time, Header = T["builtin_interfaces/msg/Time"], T["std_msgs/msg/Header"]
    topics = {"/camera/front/image_raw": "sensor_msgs/msg/Image", "/camera/wrist/image_raw": "sensor_msgs/msg/Image",
              "/joint_states": "sensor_msgs/msg/JointState", "/command": "trajectory_msgs/msg/JointTrajectory",
              "/instruction": "std_msgs/msg/String"}
    if wrong_type:
        topics[wrong_type] = "std_msgs/msg/String"
    with Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3 if storage == "sqlite3" else StoragePlugin.MCAP) as w:
        conns = {t: w.add_connection(t, m, typestore=store) for t, m in topics.items() if t != skip_topic}

        def put(topic, t, msg):
            if topic in conns:
                w.write(conns[topic], int(t * 1e9), store.serialize_cdr(msg, conns[topic].msgtype))

        put("/instruction", 10.0, T["std_msgs/msg/String"](data="press the button"))
        for k in range(frames):
            t = 10.0 + k / 10
            stamp_t = t - 0.25 if backwards and k == frames // 2 else t  # a stamp from before the last one
            hdr = Header(stamp=Time(sec=int(stamp_t), nanosec=int(round((stamp_t % 1) * 1e9))), frame_id="")
            for cam in ("front", "wrist"):
                topic = f"/camera/{cam}/image_raw"
                if topics[topic] == "std_msgs/msg/String":
                    put(topic, t, T["std_msgs/msg/String"](data="not an image"))
                    continue
                img = np.full(96 * 96 * 3, k, np.uint8)
                put(topic, t, T["sensor_msgs/msg/Image"](header=hdr, height=96, width=96, encoding="rgb8",
                                                         is_bigendian=0, step=288, data=img))
            put("/joint_states", t, T["sensor_msgs/msg/JointState"](
                header=hdr, name=JOINTS, position=np.full(7, float(k)), velocity=np.zeros(0), effort=np.zeros(0)))
            t_cmd = t + 0.01
            chdr = Header(stamp=Time(sec=int(t_cmd), nanosec=int(round((t_cmd % 1) * 1e9))), frame_id="")
            point = T["trajectory_msgs/msg/JointTrajectoryPoint"](
                positions=np.full(7, k + 0.5), velocities=np.zeros(0), accelerations=np.zeros(0), effort=np.zeros(0),
                time_from_start=T["builtin_interfaces/msg/Duration"](sec=0, nanosec=0))
            put("/command", t_cmd, T["trajectory_msgs/msg/JointTrajectory"](header=chdr, joint_names=JOINTS,
                                                                          points=[point]))
    return path


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_a_written_bag_imports_in_both_storage_formats(tmp_path, storage):
    bag = _write_bag(tmp_path / "bag", storage)
    report = import_bags([bag, _write_bag(tmp_path / "bag2", storage, frames=4)], load_contract(CONTRACT),
                         tmp_path / "ds")
    lengths, tasks, b = _frames(tmp_path / "ds")
    assert lengths == [6, 4] and tasks == [["press the button"]] * 2 and report["bags"] == 2
    np.testing.assert_array_equal(b["observation.state"][:6, 0], np.arange(6))
    np.testing.assert_array_equal(b["action"][:6, 0, 0], np.arange(6) + 0.5)  # each frame's answer


def _refused(tmp_path, bags, match):
    with pytest.raises(ContractError, match=match) as e:
        import_bags(bags, load_contract(CONTRACT), tmp_path / "ds")
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds*"))  # nothing half-written
    return str(e.value)


def test_a_bag_missing_a_contract_topic(tmp_path):
    good, bad = _write_bag(tmp_path / "good"), _write_bag(tmp_path / "bad", skip_topic="/command")
    msg = _refused(tmp_path, [good, bad], "no topic /command")
    assert str(bad) in msg


def test_a_bag_with_a_wrong_message_type(tmp_path):
    bad = _write_bag(tmp_path / "bad", "mcap", wrong_type="/camera/wrist/image_raw")
    msg = _refused(tmp_path, [bad], "topic /camera/wrist/image_raw is std_msgs/msg/String, the contract says "
                                    "sensor_msgs/msg/Image")
    assert str(bad) in msg


def test_a_bag_with_out_of_order_stamps(tmp_path):
    good = _write_bag(tmp_path / "good")
    bad = _write_bag(tmp_path / "bad", backwards=True)
    msg = _refused(tmp_path, [good, bad], "out of order")
    assert str(bad) in msg and "topic /camera/front/image_raw" in msg


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_a_truncated_bag(tmp_path, storage):
    good = _write_bag(tmp_path / "good", storage)
    bad = _write_bag(tmp_path / "bad", storage, frames=20)
    data = next(f for f in bad.iterdir() if f.suffix in (".db3", ".mcap"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    msg = _refused(tmp_path, [good, bad], "bag .*bad")
    assert "cannot be read" in msg


def test_not_a_bag(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, [tmp_path / "empty"], "cannot be read")


# --- the recorder killed mid-episode ---
def _vla(*args, **kw):
    env = {**os.environ, "ROS_DOMAIN_ID": str(DOMAIN + 1)}
    return subprocess.Popen([sys.executable, "-m", "vla.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_a_recorder_killed_mid_episode_leaves_a_readable_dataset(tmp_path):
    robot = _vla("teleop", "--tasks", "press_button", "--episodes", "5")
    recorder = _vla("record", "--contract", str(CONTRACT), "--out", str(tmp_path / "ds"))
    try:
        info = tmp_path / "ds" / "meta" / "info.json"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not info.exists():
            time.sleep(0.2)
        assert info.exists(), recorder.stdout.read() if recorder.poll() is not None else "no episode in 120 s"
        time.sleep(1.5)  # well inside the second episode (each is several seconds)
        recorder.send_signal(signal.SIGKILL)
        recorder.wait(10)
    finally:
        robot.kill()
        recorder.kill()
        robot.wait(10)
    ds = LeRobotDataset(tmp_path / "ds", horizon=1)
    assert ds.meta.info["total_episodes"] == 1  # the finished one; the one in progress is absent
    frames = ds.frames("observation.images.front", list(range(ds.meta.info["total_frames"])))
    assert frames.shape[1:] == (96, 96, 3)


# --- the contract travels with the policy ---
TINY = {
    "horizon": 4, "n_action_steps": 2,
    "backbone": {"image_size": 32, "patch_size": 8, "scale_factor": 2, "vision_hidden": 32, "vision_layers": 1,
                 "vision_heads": 2, "vision_mlp": 64, "text_hidden": 64, "text_layers": 2, "text_heads": 2,
                 "text_kv_heads": 1, "text_mlp": 128, "max_text_tokens": 8},
    "head": {"type": "l1", "hidden": 64, "layers": 1, "heads": 2, "mlp": 128},
}


class _WithSpec:
    """A policy with another spec (the fault injected: an artifact trained on another recording)."""

    def __init__(self, spec):
        self.spec = spec


def test_a_policy_trained_on_a_recording_records_its_contract_and_the_node_checks_it(recorded, tmp_path):
    cfg = TrainConfig(dataset=str(recorded["root"] / "live"), output_dir=str(tmp_path / "run"), steps=1,
                      batch_size=2, warmup_steps=1, save_every=100, log_every=1, augment=False)
    final = Trainer(VLAConfig.from_dict(TINY), cfg, progress=False).run()
    spec = PolicySpec.from_dict(json.loads((final / "spec.json").read_text()))
    assert spec.ros_contract == recorded["contract"].signature()

    shipped = PolicySpec.from_dict(json.loads((shipped_policy() / "spec.json").read_text()))
    doc = yaml.safe_load(CONTRACT.read_text())
    doc["features"]["action"]["max_age_s"] = 0.2
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(doc))
    os.environ["ROS_DOMAIN_ID"] = str(DOMAIN + 2)
    rclpy.init()
    try:
        recorded_with = dataclasses.replace(shipped, ros_contract=recorded["contract"].signature())
        with pytest.raises(ContractError, match=r"does not match the contract the policy's training data was "
                                                r"recorded with: action \(max_age_s\) differ"):
            PolicyNode(policy=_WithSpec(recorded_with), contract=str(other))
        doc["features"]["observation.state"]["names"] = ["a", "b", "c", "d", "e", "f", "g"]
        doc["features"]["action"]["names"] = ["a", "b", "c", "d", "e", "f", "h"]
        other.write_text(yaml.safe_dump(doc))
        with pytest.raises(ValueError, match="commands the joints it measures"):
            PolicyNode(policy=_WithSpec(shipped), contract=str(other))
    finally:
        rclpy.shutdown()


def test_vla_run_drives_the_sim_through_the_contract():
    """The policy node takes its topics, joints, command type and decoding from the contract."""
    r = run(["press_button"], episodes=1, params={"contract": str(CONTRACT)}, domain_id=DOMAIN + 3, progress=False)
    assert len(r["episodes"]) == 1 and r["episodes"][0]["success"]
    assert r["status"]["rejected"] == {} and r["status"]["commands"] > 0
