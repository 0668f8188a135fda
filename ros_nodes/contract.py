"""The topic contract: which ROS2 topics and fields make each dataset feature, at what rate, aligned how.

One YAML (configs/ros_contract_sim.yaml is the sim robot's) read by the recorder (`vla record`), the
bag importer (`vla import-bag`) and the policy node (its `contract` parameter). All three turn
messages into arrays with the functions here, so the frames a policy sees live are decoded exactly
as the ones it was trained on. Messages are read by attribute (header.stamp, encoding, data, name,
position, ...), so the same functions take rclpy's messages and the ones `rosbags` reads from a bag;
this module imports neither.

    fps: 10                                   the frame rate of the dataset
    clock: observation.images.front           optional: every message of that camera (publishing at
                                              fps) is a frame (default: a grid at fps)
    features:
      observation.images.<camera>:            sensor_msgs/msg/Image (rgb8 bgr8 rgba8 bgra8 mono8
        topic, type, size: [H, W]             mono16) or CompressedImage (jpeg / png); resized to size
      observation.state:                      sensor_msgs/msg/JointState (by names; field position,
        topic, type, names: [...]             velocity or effort), trajectory_msgs/msg/JointTrajectory
      action:                                 (its first point, by joint_names) or
        topic, type, names: [...]             std_msgs/msg/Float64MultiArray (in the names' order)
      every feature: align (latest | nearest | next | hold), stamp (header | receive), max_age_s
    instruction_topic: /instruction           std_msgs/msg/String; the task of the episodes
    episodes:                                 optional: split a recording without start/stop calls
      marker_topic, discard_failed            std_msgs/msg/String: an episode's start and end (episode_marker)

Alignment, for a frame at time t and a stream's samples (time s, in stream order):
    latest   the last sample with s <= t            stale when t - s > max_age_s
    nearest  the sample with the smallest |s - t|  stale when |s - t| > max_age_s
    next     the first sample with s >= t          stale when s - t > max_age_s (a command that
                                                   answers the frame's observation)
    hold     the last sample with s <= t            never stale (a topic published on change)
A frame with a stale or missing stream is dropped and counted per stream.
"""

from __future__ import annotations

import io
import json
import math
from bisect import bisect_left, bisect_right
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image as PILImage

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
JOINT_STATE = "sensor_msgs/msg/JointState"
TRAJECTORY = "trajectory_msgs/msg/JointTrajectory"
ARRAY = "std_msgs/msg/Float64MultiArray"
STRING = "std_msgs/msg/String"
IMAGE_TYPES = (IMAGE, COMPRESSED)
VECTOR_TYPES = (JOINT_STATE, TRAJECTORY, ARRAY)
HEADERLESS = (ARRAY, STRING)
ALIGNS = ("latest", "nearest", "next", "hold")
STAMPS = ("header", "receive")
JOINT_FIELDS = ("position", "velocity", "effort")
ENCODINGS = {"rgb8": (3, np.uint8), "bgr8": (3, np.uint8), "rgba8": (4, np.uint8), "bgra8": (4, np.uint8),
             "mono8": (1, np.uint8), "mono16": (1, np.uint16)}
CAMERA_PREFIX = "observation.images."
MIN_LAG_S = 1.0  # live, a frame waits this long at least for a late stream before it is judged without it
VECTOR_KEYS = ("observation.state", "action")


class ContractError(ValueError):
    """A contract YAML that cannot be used, or a message / recording that breaks its contract."""


@dataclass(frozen=True)
class Stream:
    """One feature's topic and how its samples are decoded and aligned to the frame clock."""
    key: str
    topic: str
    msgtype: str
    align: str = "latest"
    stamp: str = "header"
    max_age_s: float = 0.5
    names: tuple[str, ...] = ()
    field: str = "position"
    size: tuple[int, int] | None = None  # images: (H, W)

    @property
    def is_image(self) -> bool:
        return self.msgtype in IMAGE_TYPES


@dataclass(frozen=True)
class Contract:
    fps: int
    streams: dict[str, Stream]  # feature key -> stream; cameras first, then state, action
    instruction_topic: str | None = None
    clock: str | None = None
    marker_topic: str | None = None
    discard_failed: bool = True
    source: str = "<contract>"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def cameras(self) -> list[str]:
        return [k[len(CAMERA_PREFIX):] for k in self.streams if k.startswith(CAMERA_PREFIX)]

    def features(self, video: bool = True) -> dict:
        """The dataset features this contract records (DatasetWriter's `features`)."""
        from vla.dataset import image_feature, video_feature  # optional: keeps the node torch-free

        out = {}
        for key, s in self.streams.items():
            if s.is_image:
                h, w = s.size
                out[key] = video_feature(h, w, self.fps) if video else image_feature(h, w)
            else:
                out[key] = {"dtype": "float32", "shape": [len(s.names)], "names": list(s.names)}
        return out

    def signature(self) -> dict:
        """What a policy trained on this contract's data depends on: rate, features, their types,
        names, sizes and alignment (not the topic names, which a launch may remap)."""
        return {"fps": self.fps, "clock": self.clock, "features": {
            k: {"type": s.msgtype, "names": list(s.names), "field": s.field,
                "size": list(s.size) if s.size else None, "align": s.align, "stamp": s.stamp,
                "max_age_s": s.max_age_s} for k, s in self.streams.items()}}

    def check_matches(self, recorded: dict, what: str) -> None:
        """Raise ContractError unless `recorded` (another contract's signature) equals this one's."""
        mine = self.signature()
        if recorded == mine:
            return
        diffs = [k for k in ("fps", "clock") if recorded.get(k) != mine[k]]
        feats, theirs = mine["features"], recorded.get("features", {})
        for k in sorted(set(feats) | set(theirs)):
            if feats.get(k) != theirs.get(k):
                parts = [p for p in (feats.get(k) or {}) if (feats.get(k) or {}).get(p) != (theirs.get(k) or {}).get(p)]
                diffs.append(f"{k} ({', '.join(parts) or 'missing'})")
        raise ContractError(f"{self.source} does not match the contract {what} was recorded with: "
                            f"{'; '.join(diffs)} differ")


def _positive(doc: dict, key: str, where: str, default=None) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ContractError(f"{where}: {key} must be a positive number, got {value!r}")
    return value


def _stream(key: str, doc, where: str) -> Stream:
    if not isinstance(doc, dict):
        raise ContractError(f"{where}: expected a mapping (topic, type, ...), got {doc!r}")
    known = {"topic", "type", "align", "stamp", "max_age_s", "names", "field", "size"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ContractError(f"{where}: unknown field(s) {unknown} (known: {sorted(known)})")
    topic, msgtype = doc.get("topic"), doc.get("type")
    if not isinstance(topic, str) or not topic.startswith("/"):
        raise ContractError(f"{where}: topic must be an absolute topic name like /camera/front/image_raw, "
                            f"got {topic!r}")
    is_camera = key.startswith(CAMERA_PREFIX)
    allowed = IMAGE_TYPES if is_camera else VECTOR_TYPES
    if msgtype not in allowed:
        raise ContractError(f"{where}: type {msgtype!r} is not one of {list(allowed)}")
    align, stamp = doc.get("align", "latest"), doc.get("stamp", "header")
    if align not in ALIGNS:
        raise ContractError(f"{where}: align {align!r} is not one of {list(ALIGNS)}")
    if stamp not in STAMPS:
        raise ContractError(f"{where}: stamp {stamp!r} is not one of {list(STAMPS)}")
    if stamp == "header" and msgtype in HEADERLESS:
        raise ContractError(f"{where}: {msgtype} has no header: use stamp: receive")
    max_age = math.inf if align == "hold" else _positive(doc, "max_age_s", where, 0.5)
    names, size, fld = (), None, doc.get("field", "position")
    if is_camera:
        size = doc.get("size")
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in size)):
            raise ContractError(f"{where}: size must be [height, width] in pixels (the frames are resized to it), "
                                f"got {size!r}")
        size = (int(size[0]), int(size[1]))
        if "names" in doc:
            raise ContractError(f"{where}: a camera has no names")
    else:
        names = doc.get("names")
        if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)):
            raise ContractError(f"{where}: names must be a non-empty list of joint / channel names, got {names!r}")
        if len(set(names)) != len(names):
            raise ContractError(f"{where}: duplicate names {sorted({n for n in names if names.count(n) > 1})}")
        if fld not in JOINT_FIELDS or (fld != "position" and msgtype != JOINT_STATE):
            raise ContractError(f"{where}: field {fld!r}: {JOINT_STATE} has {list(JOINT_FIELDS)}, "
                                "the other types only positions")
        if "size" in doc:
            raise ContractError(f"{where}: a vector has no size")
        names = tuple(names)
    return Stream(key=key, topic=topic, msgtype=msgtype, align=align, stamp=stamp, max_age_s=float(max_age),
                  names=names, field=fld, size=size)


def parse_contract(doc, source: str = "<contract>") -> Contract:
    """A contract from its YAML mapping; ContractError naming the first problem."""
    if not isinstance(doc, dict):
        raise ContractError(f"{source}: expected a mapping with fps and features, got {type(doc).__name__}")
    known = {"fps", "clock", "features", "instruction_topic", "episodes"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ContractError(f"{source}: unknown key(s) {unknown} (known: {sorted(known)})")
    fps = doc.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, int) or not 0 < fps <= 1000:
        raise ContractError(f"{source}: fps must be a whole number of frames per second, got {fps!r}")
    features = doc.get("features")
    if not isinstance(features, dict) or not features:
        raise ContractError(f"{source}: features must map feature keys to topics")
    for key in features:
        if not (str(key).startswith(CAMERA_PREFIX) and len(str(key)) > len(CAMERA_PREFIX)) and key not in VECTOR_KEYS:
            raise ContractError(f"{source}: feature {key!r}: expected {CAMERA_PREFIX}<camera>, "
                                f"{' or '.join(VECTOR_KEYS)}")
    missing = [k for k in VECTOR_KEYS if k not in features]
    if missing or not any(str(k).startswith(CAMERA_PREFIX) for k in features):
        raise ContractError(f"{source}: features need at least one camera and {list(VECTOR_KEYS)}"
                            + (f" (missing {missing})" if missing else ""))
    order = sorted(features, key=lambda k: (0 if k.startswith(CAMERA_PREFIX) else 1 + VECTOR_KEYS.index(k), k))
    streams = {k: _stream(k, features[k], f"{source}: features.{k}") for k in order}
    topics = Counter(s.topic for s in streams.values())
    shared = [t for t, n in topics.items() if n > 1 and len({streams[k].msgtype for k in streams
                                                            if streams[k].topic == t}) > 1]
    if shared:
        raise ContractError(f"{source}: topic(s) {shared} carry two different message types")
    clock = doc.get("clock")
    if clock is not None and (clock not in streams or not streams[clock].is_image):
        raise ContractError(f"{source}: clock must name a camera feature ({[k for k in streams if streams[k].is_image]})"
                            f", got {clock!r}")
    if clock is not None and streams[clock].align != "latest":
        raise ContractError(f"{source}: the clock's camera {clock} must align latest (its own messages)")
    instruction = doc.get("instruction_topic")
    if instruction is not None and (not isinstance(instruction, str) or not instruction.startswith("/")):
        raise ContractError(f"{source}: instruction_topic must be an absolute topic name, got {instruction!r}")
    episodes = doc.get("episodes") or {}
    if not isinstance(episodes, dict) or set(episodes) - {"marker_topic", "discard_failed"}:
        raise ContractError(f"{source}: episodes takes marker_topic and discard_failed, got {episodes!r}")
    marker = episodes.get("marker_topic")
    if marker is not None and (not isinstance(marker, str) or not marker.startswith("/")):
        raise ContractError(f"{source}: episodes.marker_topic must be an absolute topic name, got {marker!r}")
    discard = episodes.get("discard_failed", True)
    if not isinstance(discard, bool):
        raise ContractError(f"{source}: episodes.discard_failed must be true or false, got {discard!r}")
    return Contract(fps=fps, streams=streams, instruction_topic=instruction, clock=clock,
                    marker_topic=marker,
                    discard_failed=discard, source=source, raw=doc)


def load_contract(path: str | Path) -> Contract:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ContractError(f"contract {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ContractError(f"contract {path}: not YAML ({e})") from None
    return parse_contract(doc, str(path))


# --- decoding: one path from a message to an array, live and from a bag ---
def stamp_s(msg) -> float:
    """A header stamp in seconds, computed from its integer nanoseconds: the same float as a clock's
    `nanoseconds * 1e-9` for the same instant (sec + nanosec * 1e-9 can differ in the last bit, and
    an episode marker stamped with its first frame's time would then miss that frame)."""
    return (msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec) * 1e-9


def resize_frame(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 HxWx3 -> size (H, W), bilinear with antialiasing (PIL); unchanged when already that size."""
    if img.shape[:2] == tuple(size):
        return img
    return np.asarray(PILImage.fromarray(img).resize((size[1], size[0]), PILImage.BILINEAR, reducing_gap=None))


def _as_bytes(data) -> bytes | np.ndarray:
    return data if isinstance(data, np.ndarray) else bytes(data)


def decode_image(msg, msgtype: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """An Image (see ENCODINGS; rows may be padded, step > width * channels) or a CompressedImage
    (jpeg / png) -> uint8 HxWx3 RGB, resized to `size`; anything else raises ContractError."""
    if msgtype == COMPRESSED:
        try:
            with PILImage.open(io.BytesIO(bytes(_as_bytes(msg.data)))) as im:
                img = np.asarray(im.convert("RGB"))
        except Exception as e:  # PIL raises many kinds on a broken stream
            raise ContractError(f"compressed image ({msg.format!r}) does not decode: {e}") from None
        return resize_frame(img, size) if size else img
    if msg.encoding not in ENCODINGS:
        raise ContractError(f"encoding {msg.encoding!r} (supported: {', '.join(ENCODINGS)})")
    channels, dtype = ENCODINGS[msg.encoding]
    row = msg.width * channels * np.dtype(dtype).itemsize
    data = np.frombuffer(_as_bytes(msg.data), dtype=np.uint8)
    if msg.width <= 0 or msg.height <= 0 or msg.step < row or len(data) != msg.height * msg.step:
        raise ContractError(f"data of {len(data)} bytes with step {msg.step} for {msg.width}x{msg.height} "
                            f"{msg.encoding} (needs step >= {row} and height * step bytes)")
    rows = data.reshape(msg.height, msg.step)[:, :row]
    if dtype == np.uint16:
        big = bool(getattr(msg, "is_bigendian", 0))
        px = rows.copy().view(">u2" if big else "<u2").reshape(msg.height, msg.width)
        img = np.repeat((px >> 8).astype(np.uint8)[..., None], 3, axis=2)
    else:
        px = rows.reshape(msg.height, msg.width, channels)
        if msg.encoding == "mono8":
            img = np.repeat(px, 3, axis=2)
        elif msg.encoding.startswith("bgr"):
            img = px[..., 2::-1]
        else:
            img = px[..., :3]
        img = np.ascontiguousarray(img)
    return resize_frame(img, size) if size else img


def decode_vector(msg, stream: Stream) -> np.ndarray:
    """The stream's channels (by name, in the contract's order) as float64; ContractError on a
    missing, duplicate or non-finite entry."""
    names = list(stream.names)
    if stream.msgtype == ARRAY:
        values = np.asarray(msg.data, dtype=np.float64)
        if values.shape != (len(names),):
            raise ContractError(f"{len(values)} values for {len(names)} channels {names}")
    else:
        if stream.msgtype == JOINT_STATE:
            got, values = list(msg.name), list(getattr(msg, stream.field))
        else:  # a JointTrajectory: its first point
            if not len(msg.points):
                raise ContractError("a JointTrajectory without points")
            got, values = list(msg.joint_names), list(msg.points[0].positions)
        if len(values) != len(got):
            raise ContractError(f"{len(got)} names but {len(values)} {stream.field} values")
        if len(set(got)) != len(got):
            raise ContractError(f"duplicate joint names {sorted({n for n in got if got.count(n) > 1})}")
        missing = [n for n in names if n not in got]
        if missing:
            raise ContractError(f"missing joints {missing}")
        values = np.array([values[got.index(n)] for n in names], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ContractError(f"non-finite value {values.tolist()}")
    return values


def decode(msg, stream: Stream) -> np.ndarray:
    return decode_image(msg, stream.msgtype, stream.size) if stream.is_image else decode_vector(msg, stream)


def sample_time(msg, stream: Stream, received_s: float) -> float:
    """The time a sample counts at on the frame clock: its header stamp or when it was received."""
    return stamp_s(msg) if stream.stamp == "header" else received_s


def episode_marker(text: str, received_s: float) -> tuple[str, float, bool | None] | None:
    """A marker-topic message -> ("start" | "end", its time, the verdict), or None for anything else.
    JSON {"event": "start" | "end", "stamp": s, "success": b}, or the plain words start / end. An
    episode holds the frames from its start's time up to (not including) its end's: the sim robot
    stamps a start with the episode's first observation and an end with its last, which is no
    frame (nothing answers it). Without a stamp, the time the marker was received counts."""
    word = text.strip().lower()
    doc = {"event": word} if word in ("start", "end") else None
    if doc is None:
        try:
            doc = json.loads(text)
        except (TypeError, ValueError):
            return None
    if not isinstance(doc, dict) or doc.get("event") not in ("start", "end"):
        return None
    stamp = doc.get("stamp")
    at = float(stamp) if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) else received_s
    return doc["event"], at, (bool(doc["success"]) if "success" in doc else None)


# --- alignment: samples of every stream in, frames at the contract's rate out ---
class FrameAligner:
    """Frames of a whole recording, in time order. push() samples (each stream in time order),
    frames(now) returns the frames decided by then, finish() the rest. A frame is decided once every
    stream has a sample at or after its time, or `lag_s` after it on the caller's clock (live: a
    late stream is then judged on what arrived), and picks each stream's sample by its rule: the
    same samples give the same frames live and from a bag.

    Frame times: with `clock`, every message of that camera (which publishes at fps); else a grid
    at fps from the first camera message."""

    def __init__(self, contract: Contract, lag_s: float | None = None):
        self.contract = contract
        self.period = 1.0 / contract.fps
        finite = [s.max_age_s for s in contract.streams.values() if math.isfinite(s.max_age_s)]
        self.lag = lag_s if lag_s is not None else max(finite + [self.period, MIN_LAG_S])
        self.times: dict[str, list[float]] = {k: [] for k in contract.streams}
        self.values: dict[str, list] = {k: [] for k in contract.streams}
        self.cameras = [k for k, s in contract.streams.items() if s.is_image]
        self.grid_start: float | None = None
        self.next_slot = 0  # grid: the next frame's slot
        self.clock_at = 0  # clock camera: the index of its next message
        self.last_t = -math.inf  # the time of the last frame decided
        self.stale: Counter = Counter()  # stream -> frames dropped for it (stale or missing)
        self.out_of_order: Counter = Counter()
        self.frames_out = 0

    def push(self, key: str, t: float, value) -> bool:
        """Add a sample; False (and counted) when it is older than the stream's last one."""
        times = self.times[key]
        if times and t < times[-1]:
            self.out_of_order[key] += 1
            return False
        if self.grid_start is None and key in self.cameras:
            self.grid_start = t
        times.append(t)
        self.values[key].append(value)
        return True

    def _candidate(self) -> float | None:
        if self.contract.clock is None:
            return None if self.grid_start is None else self.grid_start + self.next_slot * self.period
        times = self.times[self.contract.clock]
        return times[self.clock_at] if self.clock_at < len(times) else None

    def _decided(self, t: float, now: float | None) -> bool:
        if now is None:  # the recording ended: frames while a camera has a message at or after them
            return any(self.times[k] and self.times[k][-1] >= t for k in self.cameras)
        if t > now:
            return False
        return now - t >= self.lag or all(ts and ts[-1] >= t for ts in self.times.values())

    def _pick(self, key: str, t: float):
        s, times = self.contract.streams[key], self.times[key]
        if s.align == "next":
            i = bisect_left(times, t)
        else:
            i = bisect_right(times, t) - 1
            if s.align == "nearest" and i + 1 < len(times) and (i < 0 or times[i + 1] - t < t - times[i]):
                i += 1
        if i < 0 or i >= len(times) or abs(times[i] - t) > s.max_age_s:
            return None
        return self.values[key][i]

    def frames(self, now: float | None = None) -> list[tuple[float, dict]]:
        """(time, {feature: value}) for each frame decided by `now` on the samples' clock (None:
        the recording ended, decide the rest). A frame a stream has no fresh sample for is dropped
        and counted in `stale`."""
        out = []
        while (t := self._candidate()) is not None and self._decided(t, now):
            row = {}
            for key in self.contract.streams:
                value = self._pick(key, t)
                if value is None:
                    self.stale[key] += 1
                    row = None
                    break
                row[key] = value
            if row is not None:
                out.append((t, row))
                self.frames_out += 1
            self.last_t = t
            if self.contract.clock is None:
                self.next_slot += 1
            else:
                self.clock_at += 1
        self._trim()
        return out

    def finish(self) -> list[tuple[float, dict]]:
        return self.frames(None)

    def _trim(self) -> None:
        """Forget samples no later frame can pick (a long live recording's memory stays bounded)."""
        for key, times in self.times.items():
            keep_from = max(0, bisect_right(times, self.last_t - self.lag) - 1)
            if key == self.contract.clock:
                keep_from = min(keep_from, self.clock_at)
            if keep_from > 64:
                del times[:keep_from]
                del self.values[key][:keep_from]
                if key == self.contract.clock:
                    self.clock_at -= keep_from


def stack_frames(contract: Contract, frames: list[tuple[float, dict]]) -> dict[str, np.ndarray]:
    """Aligned frames -> the arrays of one episode for DatasetWriter.add_episode."""
    out = {}
    for key, s in contract.streams.items():
        column = [row[key] for _, row in frames]
        out[key] = np.stack(column).astype(np.uint8 if s.is_image else np.float32)
    return out
