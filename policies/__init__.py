"""The Policy interface used by evaluation, the network server and the ROS2 node."""

from vla.policies.policy import ObservationError, Policy, SpecMismatchError, spec_mismatch
from vla.policies.shipped import shipped_policy

__all__ = ["ObservationError", "Policy", "SpecMismatchError", "shipped_policy", "spec_mismatch"]
