"""A compact vision-language-action control stack: model, policies, sim, ROS2 nodes, kernels."""

__version__ = "0.1.0"
