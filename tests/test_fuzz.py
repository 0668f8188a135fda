"""The wire-format fuzzer (scripts/fuzz_server.py) in miniature against a real loopback server:
every category of broken input gets an error reply (or, raw TCP, is dropped), the server thread
lives, and a well-behaved client is answered after every batch. BENCHMARKS.md has the long run."""

import importlib.util
import threading
from pathlib import Path

import pytest

from vla.policies import Policy, shipped_policy
from vla.serving import PolicyServer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_server.py"


def load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_server", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_fuzzed_frames_never_stop_the_server_or_lose_a_reply():
    fuzzer = load_fuzzer()
    srv = PolicyServer(Policy.from_pretrained(shipped_policy()), "tcp://127.0.0.1:*", max_bytes=1 << 20)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_ms": 20}, daemon=True)
    thread.start()
    try:
        result = fuzzer.fuzz(srv.address, n=150, seed=3, check_every=25)
    finally:
        srv.stop()
        thread.join(5)
        srv.close()
    assert set(result) == set(fuzzer.CATEGORIES)
    for category, row in result.items():
        assert row["sent"] == 150, category
        assert row["lost"] == 0 and row["client_failures"] == 0, (category, row)
        if category != "tcp":
            assert row["replies"] == 150, (category, row)
    assert srv.errors >= 5 * 150 * 0.9  # nearly every fuzzed message was an error reply
