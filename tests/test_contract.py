"""The topic contract: parsing and validation, decoding every supported encoding, alignment of
streams at different rates (stale ones flagged), and the episode split a recording makes."""

import copy
import io
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image as PILImage

pytest.importorskip("sensor_msgs")
from sensor_msgs.msg import CompressedImage, Image, JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint  # noqa: E402

from vla.dataset import LeRobotDataset  # noqa: E402
from vla.ros_nodes.contract import (  # noqa: E402
    ContractError,
    FrameAligner,
    decode,
    decode_image,
    episode_marker,
    load_contract,
    parse_contract,
    stamp_s,
)
from vla.ros_nodes.recording import Recording  # noqa: E402

SIM_CONTRACT = Path(__file__).resolve().parents[1] / "configs" / "ros_contract_sim.yaml"
JOINTS = ["a", "b", "c"]


def grid_contract(**over):
    """30 Hz camera, 100 Hz joints, commands, frames at 10 Hz on a grid."""
    doc = {"fps": 10, "features": {
        "observation.images.cam": {"topic": "/cam", "type": "sensor_msgs/msg/Image", "size": [4, 6],
                                   "align": "latest", "max_age_s": 0.05},
        "observation.state": {"topic": "/joints", "type": "sensor_msgs/msg/JointState", "names": JOINTS,
                              "align": "nearest", "max_age_s": 0.02},
        "action": {"topic": "/cmd", "type": "std_msgs/msg/Float64MultiArray", "names": JOINTS,
                   "align": "hold", "stamp": "receive"}}}
    for path, value in over.items():
        node = doc
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    return doc


def test_the_sim_contract_parses():
    c = load_contract(SIM_CONTRACT)
    assert c.fps == 10 and c.cameras == ["front", "wrist"] and c.clock == "observation.images.front"
    assert list(c.streams) == ["observation.images.front", "observation.images.wrist", "observation.state", "action"]
    assert c.streams["action"].align == "next" and c.marker_topic == "/vla_sim_robot/episode"
    assert c.features()["observation.state"]["names"] == ["j1", "j2", "j3", "j4", "j5", "j6", "gripper"]


@pytest.mark.parametrize("path,value,message", [
    ("fps", 0, "fps must be a whole number"),
    ("fps", 2.5, "fps must be a whole number"),
    ("features.action", None, "missing ['action']"),
    ("features.observation.images.cam", None, "at least one camera"),
    ("features.observation.images.cam.size", [4], "size must be [height, width]"),
    ("features.observation.images.cam.type", "sensor_msgs/msg/JointState", "is not one of"),
    ("features.observation.state.names", [], "names must be a non-empty list"),
    ("features.observation.state.names", ["a", "a"], "duplicate names ['a']"),
    ("features.observation.state.align", "closest", "align 'closest' is not one of"),
    ("features.observation.state.max_age_s", -1, "max_age_s must be a positive number"),
    ("features.action.stamp", "header", "has no header: use stamp: receive"),
    ("features.action.topic", "cmd", "topic must be an absolute topic name"),
    ("features.action.colour", "red", "unknown field(s) ['colour']"),
    ("clock", "observation.state", "clock must name a camera feature"),
    ("rate", 10, "unknown key(s) ['rate']"),
])
def test_a_bad_contract_gets_one_clear_error(path, value, message):
    doc = grid_contract()
    if path.startswith("features.observation.images.cam") or path.startswith("features.observation.state") \
            or path.startswith("features.action"):
        feats = doc["features"]
        for key in ("observation.images.cam", "observation.state", "action"):
            prefix = f"features.{key}"
            if path == prefix:
                feats.pop(key)
                break
            if path.startswith(prefix + "."):
                feats[key][path[len(prefix) + 1:]] = value
                break
    else:
        doc[path] = value
    with pytest.raises(ContractError) as e:
        parse_contract(doc, "c.yaml")
    assert message in str(e.value) and str(e.value).startswith("c.yaml")


def test_a_contract_file_that_is_not_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("fps: [10\n")
    with pytest.raises(ContractError, match="not YAML"):
        load_contract(tmp_path / "c.yaml")
    with pytest.raises(ContractError, match="No such file"):
        load_contract(tmp_path / "missing.yaml")


# --- decoding ---
def _image(px: np.ndarray, encoding: str, pad: int = 0) -> Image:
    h, w = px.shape[:2]
    rows = px.reshape(h, -1).view(np.uint8) if px.dtype != np.uint8 else px.reshape(h, -1)
    step = rows.shape[1] + pad
    data = np.zeros((h, step), np.uint8)
    data[:, :rows.shape[1]] = rows
    return Image(height=h, width=w, encoding=encoding, step=step, data=data.tobytes())


RGB = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3


@pytest.mark.parametrize("encoding,px,expect", [
    ("rgb8", RGB, RGB),
    ("bgr8", RGB[..., ::-1].copy(), RGB),
    ("rgba8", np.concatenate([RGB, np.full((4, 6, 1), 9, np.uint8)], axis=2), RGB),
    ("bgra8", np.concatenate([RGB[..., ::-1], np.full((4, 6, 1), 9, np.uint8)], axis=2), RGB),
    ("mono8", RGB[..., :1].copy(), np.repeat(RGB[..., :1], 3, axis=2)),
    ("mono16", (RGB[..., :1].astype(np.uint16) << 8) | 7, np.repeat(RGB[..., :1], 3, axis=2)),
])
@pytest.mark.parametrize("pad", [0, 5])
def test_every_supported_encoding_decodes_to_rgb(encoding, px, expect, pad):
    got = decode_image(_image(np.ascontiguousarray(px), encoding, pad), "sensor_msgs/msg/Image")
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_compressed_images_decode(fmt):
    buf = io.BytesIO()
    PILImage.fromarray(RGB).save(buf, format=fmt.upper(), quality=100)
    msg = CompressedImage(format=fmt, data=buf.getvalue())
    got = decode_image(msg, "sensor_msgs/msg/CompressedImage")
    assert got.shape == (4, 6, 3)
    assert np.abs(got.astype(int) - RGB).max() <= (0 if fmt == "png" else 12)
    with pytest.raises(ContractError, match="does not decode"):
        decode_image(CompressedImage(format=fmt, data=b"\x89PNG broken"), "sensor_msgs/msg/CompressedImage")


def test_images_are_resized_to_the_contract_size_and_bad_ones_refused():
    c = parse_contract(grid_contract())
    big = np.repeat(np.repeat(RGB, 2, axis=0), 2, axis=1)  # 8 x 12
    got = decode(_image(big, "rgb8"), c.streams["observation.images.cam"])
    assert got.shape == (4, 6, 3) and np.abs(got.astype(int) - RGB).mean() < 6
    with pytest.raises(ContractError, match="encoding 'yuv422'"):
        decode_image(Image(height=4, width=6, encoding="yuv422", step=12, data=bytes(48)), "sensor_msgs/msg/Image")
    with pytest.raises(ContractError, match="needs step >= 18"):
        decode_image(Image(height=4, width=6, encoding="rgb8", step=18, data=bytes(50)), "sensor_msgs/msg/Image")


def test_vectors_decode_by_name_from_each_message_type():
    c = load_contract(SIM_CONTRACT)
    names = list(c.streams["observation.state"].names)
    js = JointState(name=["extra"] + names[::-1], position=[9.0] + [float(i) for i in range(7)][::-1])
    np.testing.assert_array_equal(decode(js, c.streams["observation.state"]), np.arange(7))
    traj = JointTrajectory(joint_names=names, points=[JointTrajectoryPoint(positions=[0.5] * 7)])
    np.testing.assert_array_equal(decode(traj, c.streams["action"]), [0.5] * 7)
    with pytest.raises(ContractError, match=r"missing joints \['gripper'\]"):
        decode(JointState(name=names[:6], position=[0.0] * 6), c.streams["observation.state"])
    with pytest.raises(ContractError, match="non-finite"):
        decode(JointState(name=names, position=[0.0] * 6 + [math.nan]), c.streams["observation.state"])
    with pytest.raises(ContractError, match="without points"):
        decode(JointTrajectory(joint_names=names), c.streams["action"])
    g = parse_contract(grid_contract())
    with pytest.raises(ContractError, match="2 values for 3 channels"):
        decode(Float64MultiArray(data=[1.0, 2.0]), g.streams["action"])


# --- alignment ---
def test_streams_at_30_and_100_hz_align_to_10_hz_frames_with_stale_ones_flagged():
    """Camera 30 Hz, joints 100 Hz, a command held from 0.35 s; the joints go silent from 1.0 to
    1.5 s: the frames in that gap are dropped and counted against the joint stream."""
    a = FrameAligner(parse_contract(grid_contract()))
    events = [(i / 30, "observation.images.cam", i) for i in range(60)]
    events += [(j / 100, "observation.state", j) for j in range(200) if not 100 < j < 150]
    events += [(0.35, "action", "cmd")]
    for t, key, value in sorted(events, key=lambda e: e[0]):
        a.push(key, t, value)
    frames = a.finish()
    times = [round(t, 3) for t, _ in frames]
    # the command is held from 0.35 s on: no frame before it; 1.1 .. 1.4 s lack a joint state within 20 ms
    assert times == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 1.6, 1.7, 1.8, 1.9]
    for t, row in frames:
        assert row["observation.images.cam"] == math.floor(t * 30 + 1e-9)  # the latest camera frame
        assert row["observation.state"] == round(t * 100)  # the nearest joint state
        assert row["action"] == "cmd"
    assert a.stale == {"action": 4, "observation.state": 4}


def test_next_takes_the_first_sample_after_the_frame_and_a_clock_camera_sets_frame_times():
    doc = grid_contract(**{"features.action.align": "next", "features.action.max_age_s": 0.05})
    doc["clock"] = "observation.images.cam"
    a = FrameAligner(parse_contract(doc))
    for k in range(5):  # an observation at k/10 s, the command answering it 10 ms later
        a.push("observation.images.cam", k / 10, f"obs{k}")
        a.push("observation.state", k / 10, k)
        a.push("action", k / 10 + 0.01, f"cmd{k}")
    rows = [row for _, row in a.finish()]
    assert [(r["observation.images.cam"], r["action"]) for r in rows] == [(f"obs{k}", f"cmd{k}") for k in range(5)]


def test_live_frames_wait_for_every_stream_then_the_lag():
    """Decided live only once every stream has a sample at or after the frame (or the lag passed):
    the same samples give the same frames however they were interleaved."""
    c = parse_contract(grid_contract())
    events = sorted([(i / 30, "observation.images.cam", i) for i in range(30)]
                    + [(j / 100, "observation.state", j) for j in range(100)] + [(0.0, "action", "x")])
    offline = FrameAligner(c)
    for t, k, v in events:
        offline.push(k, t, v)
    want = offline.finish()
    live, got = FrameAligner(c), []
    for t, k, v in events:
        live.push(k, t, v)
        got += live.frames(now=t + 0.003)  # each message arrives 3 ms after its stamp
    got += live.finish()
    assert [t for t, _ in got] == [t for t, _ in want] and [r for _, r in got] == [r for _, r in want]


def test_out_of_order_samples_are_refused_and_counted():
    a = FrameAligner(parse_contract(grid_contract()))
    assert a.push("observation.state", 1.0, 0)
    assert not a.push("observation.state", 0.5, 1)
    assert a.out_of_order == {"observation.state": 1}


def test_episode_markers():
    assert episode_marker('{"event": "end", "success": false, "stamp": 12.5}', 13.0) == ("end", 12.5, False)
    assert episode_marker('{"event": "start"}', 13.0) == ("start", 13.0, None)
    assert episode_marker(" End ", 13.0) == ("end", 13.0, None)
    assert episode_marker('{"success": true}', 13.0) is None and episode_marker("done", 13.0) is None


# --- a recording, without ROS: episodes split at end markers, failures discarded, each committed ---
def _feed(rec: Recording, start: float, n: int, names=JOINTS) -> float:
    for k in range(n):
        t = start + k / 10
        img = np.full((4, 6, 3), k, np.uint8)
        rec.on_message("observation.images.front", _stamped(_image(img, "rgb8"), t), t)
        rec.on_message("observation.images.wrist", _stamped(_image(img, "rgb8"), t), t)
        rec.on_message("observation.state", _stamped(JointState(name=names, position=[float(k)] * 3), t), t)
        cmd = JointTrajectory(joint_names=names, points=[JointTrajectoryPoint(positions=[k + 0.5] * 3)])
        rec.on_message("action", _stamped(cmd, t + 0.01), t + 0.01)
        rec.poll(t + 0.02)
    return start + (n - 1) / 10


def _stamped(msg, t):
    msg.header.stamp.sec, msg.header.stamp.nanosec = int(t), int(round((t - int(t)) * 1e9))
    return msg


def _small_sim_contract():
    doc = yaml.safe_load(SIM_CONTRACT.read_text())
    for key in ("observation.images.front", "observation.images.wrist"):
        doc["features"][key]["size"] = [4, 6]
    for key in ("observation.state", "action"):
        doc["features"][key]["names"] = JOINTS
    return parse_contract(doc)


def test_a_recording_splits_at_end_markers_discards_failures_and_commits_each_episode(tmp_path):
    c = _small_sim_contract()
    rec = Recording(c, tmp_path / "ds", video=False)
    _feed(rec, 99.0, 4)  # before any start marker (a recorder started mid-episode): dropped
    rec.on_marker(f'{{"event": "end", "stamp": {99.3}}}', 99.35)
    rec.on_instruction("pick the cube")
    rec.on_marker('{"event": "start", "stamp": 100.0}', 100.001)
    last = _feed(rec, 100.0, 6)  # frames 100.0 .. 100.5; the last one is the episode's final state
    rec.on_marker(f'{{"event": "end", "success": true, "stamp": {last}}}', last + 0.05)
    assert LeRobotDataset(tmp_path / "ds").meta.info["total_episodes"] == 1  # on disk before the next begins
    rec.on_instruction("open the drawer")
    rec.on_marker('{"event": "start", "stamp": 101.0}', 101.001)
    last = _feed(rec, 101.0, 4)
    rec.on_marker(f'{{"event": "end", "success": false, "stamp": {last}}}', last + 0.05)
    rec.on_instruction("press the button")
    last = _feed(rec, 102.0, 3)  # the start marker arrives after the episode's first frames were decided
    rec.on_marker('{"event": "start", "stamp": 102.0}', 102.25)
    rec.on_marker(f'{{"event": "end", "success": true, "stamp": {last}}}', last + 0.05)
    rec.on_marker('{"event": "start", "stamp": 103.0}', 103.0)
    _feed(rec, 103.0, 3)  # never ends: not written
    rec.close()
    ds = LeRobotDataset(tmp_path / "ds")
    assert ds.meta.info["total_episodes"] == 2 and [e["length"] for e in ds.meta.episodes] == [5, 2]
    assert [list(e["tasks"]) for e in ds.meta.episodes] == [["pick the cube"], ["press the button"]]
    assert ds.meta.info["ros_contract"] == c.signature()
    np.testing.assert_allclose(ds.batch([0])["action"][0, 0], [0.5] * 3)  # frame 0 paired with the command it got
    assert rec.report()["discarded"] == 1 and rec.report()["unfinished"] == 1


def test_a_recording_refuses_a_dataset_of_another_contract(tmp_path):
    c = _small_sim_contract()
    rec = Recording(c, tmp_path / "ds", task="t", video=False)
    rec.start(5.0)
    last = _feed(rec, 5.0, 3)
    rec.on_marker(f'{{"event": "end", "stamp": {last}}}', last)
    doc = copy.deepcopy(c.raw)
    doc["fps"] = 20
    with pytest.raises(Exception, match="fps"):
        Recording(parse_contract(doc), tmp_path / "ds", task="t", video=False)


def test_a_header_stamp_in_seconds_is_the_clocks_float_for_that_instant():
    """A marker stamped with `clock.now().nanoseconds * 1e-9` must equal the stamp_s() of the frame
    published at that instant, or the episode it starts misses its first frame (it did: sec +
    nanosec * 1e-9 differs in the last bit for many instants)."""
    for ns in range(1_796_209_950_000_000_000, 1_796_209_952_000_000_000, 8_021_947):
        msg = JointState()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(ns, 1_000_000_000)
        assert stamp_s(msg) == ns * 1e-9
