"""Serving a policy over the network: the wire protocol, the zmq server and its client.

    from vla.serving import PolicyClient
    client = PolicyClient("tcp://gpu-box:5555")   # the Policy interface: reset / act / act_chunk / spec
"""

from vla.serving.client import PolicyClient, ServerError
from vla.serving.protocol import PROTOCOL_VERSION, ProtocolError
from vla.serving.server import PolicyServer, load_authorized_keys, parse_bind

__all__ = ["PROTOCOL_VERSION", "PolicyClient", "PolicyServer", "ProtocolError", "ServerError", "load_authorized_keys",
           "parse_bind"]
