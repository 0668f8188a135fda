"""MJCF for the task objects, inserted into sim/assets/tabletop.xml.

Static fixtures (plates, bin, buttons, cabinet) are mocap bodies so a reset can move them through
`data.mocap_pos` without recompiling the model; loose objects (cubes) have a free joint.
"""

from __future__ import annotations

from pathlib import Path

import mujoco

ASSET = Path(__file__).parent / "assets" / "tabletop.xml"

COLORS = {
    "red": "0.85 0.15 0.15 1",
    "green": "0.20 0.70 0.25 1",
    "blue": "0.20 0.35 0.85 1",
    "yellow": "0.92 0.80 0.20 1",
}

CUBE_HALF = 0.02
CUBE_MASS = 0.05  # kg: a 4 cm wooden block

# Cabinet geometry, relative to the cabinet body. The drawer slides out along -x (toward the arm).
DRAWER_FRONT_X = -0.106  # outer face of the drawer front when closed
DRAWER_HANDLE_GAP_X = -0.126  # middle of the gap between the drawer front and the handle bar
DRAWER_HANDLE_Z = 0.065
DRAWER_TRAVEL = 0.16

BUTTON_CAP_TOP = 0.036  # height of an unpressed cap's top surface
BUTTON_TRAVEL = 0.012


def cube(name: str, color: str) -> str:
    h = CUBE_HALF
    return f"""
    <body name="{name}" pos="0 0 {h}">
      <freejoint name="{name}"/>
      <geom name="{name}" class="object" type="box" size="{h} {h} {h}" mass="{CUBE_MASS}"
            rgba="{COLORS[color]}"/>
    </body>"""


def plate(name: str, color: str) -> str:
    return f"""
    <body name="{name}" mocap="true" pos="0 0 0">
      <geom name="{name}" class="object" type="cylinder" size="0.06 0.003" pos="0 0 0.003"
            rgba="{COLORS[color]}"/>
    </body>"""


def bin_(name: str) -> str:
    wall = 'class="object" type="box" rgba="0.45 0.45 0.5 1"'
    return f"""
    <body name="{name}" mocap="true" pos="0 0 0">
      <geom name="{name}_bottom" {wall} size="0.075 0.075 0.003" pos="0 0 0.003"/>
      <geom {wall} size="0.075 0.004 0.02" pos="0 0.071 0.023"/>
      <geom {wall} size="0.075 0.004 0.02" pos="0 -0.071 0.023"/>
      <geom {wall} size="0.004 0.067 0.02" pos="0.071 0 0.023"/>
      <geom {wall} size="0.004 0.067 0.02" pos="-0.071 0 0.023"/>
    </body>"""


def button(name: str, color: str) -> str:
    return f"""
    <body name="{name}" mocap="true" pos="0 0 0">
      <!-- the housing must never touch its cap: MuJoCo 3.3 does not filter this parent-child pair -->
      <geom class="object" type="box" size="0.03 0.03 0.01" pos="0 0 0.01" rgba="0.3 0.3 0.32 1"
            contype="2" conaffinity="2"/>
      <body name="{name}_cap" pos="0 0 0.02">
        <joint name="{name}" type="slide" axis="0 0 1" range="-{BUTTON_TRAVEL} 0" stiffness="300"
               damping="3" springref="0"/>
        <geom name="{name}_cap" class="object" type="cylinder" size="0.018 0.008" pos="0 0 0.008"
              mass="0.01" rgba="{COLORS[color]}"/>
      </body>
    </body>"""


def cabinet(name: str) -> str:
    shell = 'class="object" type="box" rgba="0.55 0.42 0.30 1"'
    box = 'class="object" type="box" rgba="0.80 0.78 0.72 1" density="400"'
    handle = 'class="object" type="box" rgba="0.2 0.2 0.22 1"'
    return f"""
    <body name="{name}" mocap="true" pos="0 0 0">
      <geom {shell} size="0.1 0.12 0.005" pos="0 0 0.005"/>
      <geom {shell} size="0.1 0.12 0.005" pos="0 0 0.107"/>
      <geom {shell} size="0.1 0.005 0.051" pos="0 0.115 0.056"/>
      <geom {shell} size="0.1 0.005 0.051" pos="0 -0.115 0.056"/>
      <geom {shell} size="0.005 0.12 0.051" pos="0.095 0 0.056"/>
      <body name="{name}_drawer" pos="0 0 0">
        <joint name="{name}" type="slide" axis="-1 0 0" range="0 {DRAWER_TRAVEL}" damping="8"
               frictionloss="0.3" armature="0.05"/>
        <geom {box} size="0.09 0.104 0.004" pos="-0.005 0 0.016"/>
        <geom name="{name}_front" {box} size="0.006 0.11 0.045" pos="-0.1 0 0.057"/>
        <geom {box} size="0.09 0.004 0.03" pos="-0.005 0.1 0.045"/>
        <geom {box} size="0.09 0.004 0.03" pos="-0.005 -0.1 0.045"/>
        <geom {box} size="0.004 0.104 0.03" pos="0.083 0 0.045"/>
        <geom name="{name}_handle" {handle} size="0.006 0.05 0.006" pos="-0.152 0 {DRAWER_HANDLE_Z}"/>
        <geom {handle} size="0.02 0.005 0.005" pos="-0.126 0.045 {DRAWER_HANDLE_Z}"/>
        <geom {handle} size="0.02 0.005 0.005" pos="-0.126 -0.045 {DRAWER_HANDLE_Z}"/>
      </body>
    </body>"""


def strip(name: str, y: float) -> str:
    """A white tape strip on the table marking a push target region (visual only)."""
    return f"""
    <body name="{name}" pos="0.42 {y} 0.0005">
      <geom type="box" size="0.16 0.006 0.0005" rgba="0.95 0.95 0.95 1" contype="0" conaffinity="0"/>
    </body>"""


def build_model(objects_xml: str) -> mujoco.MjModel:
    xml = ASSET.read_text().replace("<!-- OBJECTS -->", objects_xml)
    return mujoco.MjModel.from_xml_string(xml)
