"""The Policy interface used by evaluation, the network server and the ROS2 node."""

from vla.policies.policy import (
    ObservationError,
    Policy,
    SpecMismatchError,
    spec_mismatch,
)

__all__ = ["ObservationError", "Policy", "SpecMismatchError", "spec_mismatch"]
