"""The policy node alone (its local inference server, the shipped policy) fed by a stand-in driver
at 10 Hz: the memory of the node and the server over time, without the sim in the process.

    .venv/bin/python scripts/node_memory.py [minutes]
"""
import os, sys, time, array, threading, numpy as np
os.environ.setdefault("ROS_DOMAIN_ID", "85")
import rclpy
from rclpy.node import Node
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from vla.ros_nodes.policy_node import PolicyNode, LATCHED_QOS
from vla.ros_nodes.run import rss_mb
rclpy.init()
node = PolicyNode()
drv = Node("drv"); rng = np.random.default_rng(0)
cams = [drv.create_publisher(Image, f"/camera/{c}/image_raw", qos_profile_sensor_data) for c in ("front","wrist")]
js = drv.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
drv.create_publisher(String, "/instruction", LATCHED_QOS).publish(String(data="press the red button"))
imgs = [rng.integers(0,255,96*96*3,dtype=np.uint8).tobytes() for _ in range(20)]
k = [0]
def pub():
    k[0] += 1; st = drv.get_clock().now().to_msg()
    for p in cams:
        m = Image(height=96,width=96,encoding="rgb8",step=288,data=array.array("B", imgs[k[0]%20])); m.header.stamp=st; p.publish(m)
    j = JointState(name=node.joint_names, position=[0.0]*7); j.header.stamp=st; js.publish(j)
drv.create_timer(0.1, pub)
ex = SingleThreadedExecutor(); ex.add_node(node); ex.add_node(drv)
t = threading.Thread(target=ex.spin, daemon=True); t.start()
t0 = time.time()
for i in range(int(float(sys.argv[1] if len(sys.argv) > 1 else 4) * 2) + 1):
    time.sleep(30 if i else 20)
    print(round(time.time()-t0), "node", rss_mb(os.getpid()), "server", rss_mb(node._local.process.pid), node.status()["commands"], flush=True)
ex.shutdown(); node.destroy_node(); rclpy.shutdown()
