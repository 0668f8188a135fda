"""The policy node alone (its local inference server, the shipped policy), fed by a stand-in driver
at 10 Hz: the memory of the node and of the server over time, without the sim in the process (the
process that drives a real arm).

    .venv/bin/python scripts/node_memory.py [minutes, default 4]
"""

import array
import os
import sys
import threading
import time

import numpy as np

os.environ.setdefault("ROS_DOMAIN_ID", "85")

import rclpy  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from vla.ros_nodes.policy_node import LATCHED_QOS, PolicyNode  # noqa: E402
from vla.ros_nodes.run import rss_mb  # noqa: E402


def main(minutes: float) -> None:
    rclpy.init()
    node = PolicyNode()
    driver = Node("stand_in_driver")
    size = node.size
    cams = [driver.create_publisher(Image, f"/camera/{c}/image_raw", qos_profile_sensor_data) for c in node.cameras]
    joints = driver.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
    driver.create_publisher(String, "/instruction", LATCHED_QOS).publish(String(data="press the red button"))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, size * size * 3, dtype=np.uint8).tobytes() for _ in range(20)]
    tick = iter(range(10 ** 9))

    def publish():
        frame, stamp = frames[next(tick) % len(frames)], driver.get_clock().now().to_msg()
        for pub in cams:
            msg = Image(height=size, width=size, encoding="rgb8", step=size * 3, data=array.array("B", frame))
            msg.header.stamp = stamp
            pub.publish(msg)
        js = JointState(name=node.joint_names, position=[0.0] * len(node.joint_names))
        js.header.stamp = stamp
        joints.publish(js)

    driver.create_timer(0.1, publish)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    executor.add_node(driver)
    threading.Thread(target=executor.spin, daemon=True).start()
    t0 = time.monotonic()
    for i in range(int(minutes * 2) + 1):
        time.sleep(30 if i else 20)
        print(f"{time.monotonic() - t0:5.0f} s  node {rss_mb(os.getpid()):.2f} MB  server "
              f"{rss_mb(node._local.process.pid):.2f} MB  commands {node.status()['commands']}", flush=True)
    executor.shutdown()
    node.destroy_node()
    driver.destroy_node()
    rclpy.shutdown()


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 4.0)
