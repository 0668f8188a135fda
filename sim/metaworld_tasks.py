"""MetaWorld's task names, the sets LeRobot evaluates (single tasks, MT10, MT50 and the difficulty
groups of Seo et al., as LeRobot's MetaWorld env groups them) and an instruction per task. Plain data:
importable where metaworld is not installed (the main environment resolves `--tasks` with it).

MetaWorld 3.1.1 pins mujoco 3.3.0, so its envs run in a second environment (`bash scripts/setup.sh
--metaworld` makes `.venv-metaworld`), served over zmq by `vla.serving.env_server`.
"""

from __future__ import annotations

SUITE = "metaworld"
CAMERA = "corner2"  # LeRobot's MetaWorld camera; it renders upside down and mirrored: flipped upright
MAX_STEPS = 500  # MetaWorld's max_path_length

MT10 = ["reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3"]

GROUPS = {
    "easy": ["button-press-v3", "button-press-topdown-v3", "button-press-topdown-wall-v3", "button-press-wall-v3",
             "coffee-button-v3", "dial-turn-v3", "door-close-v3", "door-lock-v3", "door-open-v3", "door-unlock-v3",
             "drawer-close-v3", "drawer-open-v3", "faucet-close-v3", "faucet-open-v3", "handle-press-v3",
             "handle-press-side-v3", "handle-pull-v3", "handle-pull-side-v3", "lever-pull-v3", "plate-slide-v3",
             "plate-slide-back-v3", "plate-slide-back-side-v3", "plate-slide-side-v3", "reach-v3", "reach-wall-v3",
             "window-close-v3", "window-open-v3", "peg-unplug-side-v3"],
    "medium": ["basketball-v3", "bin-picking-v3", "box-close-v3", "coffee-pull-v3", "coffee-push-v3", "hammer-v3",
               "peg-insert-side-v3", "push-wall-v3", "soccer-v3", "sweep-v3", "sweep-into-v3"],
    "hard": ["assembly-v3", "hand-insert-v3", "pick-out-of-hole-v3", "pick-place-v3", "push-v3", "push-back-v3"],
    "very_hard": ["shelf-place-v3", "disassemble-v3", "stick-pull-v3", "stick-push-v3", "pick-place-wall-v3"],
}
MT50 = [t for group in GROUPS.values() for t in group]

# what the instruction says: the task in words (the policy is trained on these strings)
INSTRUCTIONS = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "dunk the basketball into the basket",
    "bin-picking-v3": "move the puck from one bin into the other",
    "box-close-v3": "grasp the cover and close the box with it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top, past the wall",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "press the button, past the wall",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "rotate the dial 180 degrees",
    "disassemble-v3": "pick the nut off the peg",
    "door-close-v3": "close the door with its revolving joint",
    "door-lock-v3": "lock the door by rotating the lock clockwise",
    "door-open-v3": "open the door with its revolving joint",
    "door-unlock-v3": "unlock the door by rotating the lock counter-clockwise",
    "hand-insert-v3": "insert the gripper into the hole",
    "drawer-close-v3": "push the drawer shut",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "rotate the faucet counter-clockwise",
    "faucet-close-v3": "rotate the faucet clockwise",
    "hammer-v3": "hammer the screw into the wall",
    "handle-press-side-v3": "press the handle down sideways",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up sideways",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever down 90 degrees",
    "peg-insert-side-v3": "insert the peg sideways into the hole",
    "pick-place-wall-v3": "pick up the puck and place it at the goal, over the wall",
    "pick-out-of-hole-v3": "pick up the puck from the hole",
    "reach-v3": "reach the goal position",
    "push-back-v3": "push the puck back to the goal",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-back-v3": "get the plate from the cabinet",
    "plate-slide-back-side-v3": "get the plate from the cabinet, sideways",
    "peg-unplug-side-v3": "unplug the peg sideways",
    "soccer-v3": "kick the soccer ball into the goal",
    "stick-push-v3": "grasp the stick and push the box with it",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "push-wall-v3": "push the puck to the goal, around the wall",
    "reach-wall-v3": "reach the goal position, past the wall",
    "shelf-place-v3": "pick up the puck and place it onto the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "push the window open",
    "window-close-v3": "push the window closed",
}


def resolve_metaworld_tasks(spec: str) -> list[str]:
    """'MT10', 'MT50', a difficulty group, or task names (with or without '-v3'), comma-separated,
    -> task names in order, each once; an unknown name raises ValueError naming it."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        names = {"MT10": MT10, "MT50": MT50, "all": MT50}.get(part) or GROUPS.get(part)
        if names is None:
            name = part if part.endswith("-v3") else f"{part}-v3"
            if name not in INSTRUCTIONS:
                raise ValueError(f"unknown MetaWorld task {part!r}: give MT10, MT50, one of {sorted(GROUPS)} "
                                 "or task names such as reach-v3")
            names = [name]
        out += [n for n in names if n not in out]
    if not out:
        raise ValueError("no MetaWorld task given")
    return out
