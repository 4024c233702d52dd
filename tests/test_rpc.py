"""SparQ through llama.cpp's RPC backend, on loopback: the fork's ggml-rpc-server (built with the
library, `sparq-cpp rpc-server`), the model's layers on one server and split over two, against
local SparQ. Each scenario runs in its own process (tests/rpc_scenarios.py says why)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_sparq import ROUNDING

HERE = Path(__file__).resolve().parent


def _scenario(which):
    r = subprocess.run([sys.executable, str(HERE / "rpc_scenarios.py"), which], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("which", ["one", pytest.param("two", marks=pytest.mark.slow)])
def test_rpc_servers_decode_as_local_sparq(which):
    # layers on RPC servers run the portable graph (the client cannot ask a server whether it has
    # the fused op); local layers the fused op. Measured: max logit difference 1.29, top-1
    # agreement 0.94 (one server) over 16 tokens; the bound is the rounding of this model
    out = _scenario(which)
    print(which, out)
    assert out["local"]["devices"] == {"CPU": 30} and out["local"]["n_layers_ops"] == 0
    rem = out["remote"]
    assert rem["n_tokens_sparq"] == out["local"]["n_tokens_sparq"] == 16
    assert rem["n_layers_sparq"] == rem["n_layers_ops"] == 30
    devices = rem["devices"]
    assert sum(devices.values()) == 30 and all(d.startswith("RPC") for d in devices), devices
    assert len(devices) == (1 if which == "one" else 2), devices
    assert out["max_diff"] < ROUNDING["smollm2-135m"]


def test_rpc_unreachable_server_raises_before_loading():
    out = _scenario("unreachable")
    assert out["raised"] == "ConnectionError", out
    assert "cannot reach the RPC server" in out["message"]


def test_rpc_server_lost_mid_decode_raises():
    # a relay in front of the server kills it the moment a 512-token batch's graph has been sent to
    # it (a fault at the same point of every run, whatever the machine's speed): that eval raises
    # RpcServerLost (a ConnectionError and a RuntimeError), so does the next one, at once, and the
    # model closes; upstream's ggml-rpc aborts the process here. The batch takes 3.3 s on the
    # 1-thread server, so an error within a few seconds did not wait for the dead server
    out = _scenario("lost")
    print(out)
    assert out["killed_in_compute"], out
    mid = out["mid_batch"]
    assert mid["raised"] == "RpcServerLost" and mid["is_runtime_error"], out
    assert "stopped answering" in mid["message"] and "reload the model" in mid["message"]
    assert mid["after_s"] < 10, out
    assert out["next_eval"]["raised"] == "RpcServerLost" and out["next_eval"]["after_s"] < 10, out
    assert out["close_s"] < 10, out


def test_rpc_server_lost_between_decodes_then_another_model():
    # killed between two decodes with SIGPIPE at its default (as in a C program): the next eval
    # raises instead of the process dying (the fork's ggml-rpc sends with MSG_NOSIGNAL); a model
    # on a new server then raises ConnectionError naming the dead one, which ggml still offers
    # every model, instead of aborting in ggml-rpc's connect
    out = _scenario("lost_between")
    assert out["between"]["raised"] == "RpcServerLost", out
    assert out["reload"]["raised"] == "ConnectionError", out
    assert "registered earlier in this process, is gone" in out["reload"]["message"], out


def test_rpc_servers_argument_is_checked():
    from sparq_cpp.rpc import parse_endpoints

    assert parse_endpoints("127.0.0.1:50052, host:1") == ["127.0.0.1:50052", "host:1"]
    for bad in ("", "nohost", "host:", "host:0", "host:99999", ":5"):
        with pytest.raises(ValueError, match="rpc_servers"):
            parse_endpoints(bad)


def test_rpc_server_command_runs_the_forks_server():
    # sparq-cpp rpc-server hands its arguments to the fork's ggml-rpc-server
    exe = Path(sys.executable).parent / "sparq-cpp"
    r = subprocess.run([str(exe), "rpc-server", "--help"], capture_output=True, text=True, timeout=60)
    assert "--port" in r.stdout + r.stderr and "--host" in r.stdout + r.stderr
