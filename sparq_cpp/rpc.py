"""llama.cpp's RPC backend with SparQ: layers on other machines, each running an rpc-server.

``Llama(..., rpc_servers="host:port,host:port", n_gpu_layers=-1)`` puts the model's layers on
those servers (llama.cpp's ``--rpc``); ``sparq-cpp rpc-server`` runs the fork's server
(``ggml-rpc-server``, built with the library). SparQ layers on a server run the portable graph
of standard ggml ops (docs/sparq.md): ggml-rpc's client answers that a server supports every op
without asking it, so the client cannot tell whether a server has the fused op, and the
standard ops run on any server, upstream's included.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from ._lib import LIB_PATH, ffi, lib

_REGISTERED: List[str] = []  # endpoints added in this process (ggml keeps them until exit)


def server_binary() -> Path:
    """The fork's ggml-rpc-server, beside the library."""
    p = Path(LIB_PATH).parent / "ggml-rpc-server"
    if not p.exists():
        raise FileNotFoundError(f"no ggml-rpc-server beside {LIB_PATH}: the library was built without SPARQ_RPC")
    return p


def parse_endpoints(servers: str) -> List[str]:
    """'host:port,host:port' -> the endpoints; ValueError on a malformed one."""
    out = []
    for e in (x.strip() for x in servers.split(",")):
        host, _, port = e.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"rpc_servers: {e!r} is not host:port")
        out.append(e)
    if not out:
        raise ValueError("rpc_servers: no server given")
    return out


def add_servers(servers: str, timeout: float = 5.0) -> List[str]:
    """Registers the RPC servers with ggml, as llama.cpp's --rpc does, so that a model loaded next
    can put layers on them. Each must accept a connection first: ggml aborts the process on a
    server it cannot reach, so an unreachable one raises ConnectionError here instead."""
    endpoints = parse_endpoints(servers)
    try:
        add = lib.ggml_backend_rpc_add_server
    except AttributeError:
        raise ValueError("rpc_servers: the library was built without the RPC backend (SPARQ_RPC=OFF)") from None
    for e in endpoints:
        if e in _REGISTERED:
            continue
        err = _connect_error(e, timeout)
        if err is not None:
            raise ConnectionError(f"rpc_servers: cannot reach the RPC server {e} ({err})")
        reg = add(e.encode())
        if reg == ffi.NULL:
            raise ConnectionError(f"rpc_servers: the RPC server {e} was not accepted")
        lib.ggml_backend_register(reg)
        _REGISTERED.append(e)
    return endpoints


class RpcServerLost(ConnectionError, RuntimeError):
    """An RPC server holding some of a model's layers stopped answering during a decode. The
    model's layers and KV cache on it are gone: start the server again and reload the model.
    A ConnectionError, and a RuntimeError like llama-cpp-python's other decode failures."""


def _connect_error(endpoint: str, timeout: float = 2.0) -> Optional[OSError]:
    """None when the server at host:port accepts a connection, else why not."""
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return None
    except OSError as err:
        return err


def lost_error(endpoints: List[str]) -> Optional[RpcServerLost]:
    """After a failed decode: RpcServerLost naming the servers that no longer accept a connection,
    or None when all do (the failure had another cause, or a server was restarted in between: the
    library's log names the server it lost)."""
    gone = [e for e in endpoints if _connect_error(e) is not None]
    if not gone:
        return None
    return RpcServerLost(f"RPC server {', '.join(gone)} stopped answering during a decode: the model's "
                         "layers and KV cache there are lost; start the server again and reload the model")


def check_registered() -> None:
    """Before a model loads: ggml offers every RPC server registered in this process to every
    model (there is no unregistering), so one that has gone away fails the load. ConnectionError
    naming it, instead of llama-cpp-python's bare "Failed to load model"."""
    gone = [e for e in _REGISTERED if _connect_error(e) is not None]
    if gone:
        raise ConnectionError(f"the RPC server {', '.join(gone)}, registered earlier in this process, is gone: ggml keeps "
                              "RPC servers for the life of the process, so every model load would use it; start it "
                              "again at the same address, or load the model in a new process")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RpcServer:
    """A local ggml-rpc-server process (tests, one-machine trials):
    ``with RpcServer(port=free_port()) as srv: Llama(..., rpc_servers=srv.endpoint)``."""

    def __init__(self, host: str = "127.0.0.1", port: Optional[int] = None, threads: Optional[int] = None,
                 log: Optional[str] = None):
        self.host, self.port = host, port or free_port(host)
        cmd = [str(server_binary()), "-H", host, "-p", str(self.port)]
        if threads:
            cmd += ["-t", str(threads)]
        self._log = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ggml-rpc-server exited with {self.proc.returncode}")
            try:
                socket.create_connection((host, self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"ggml-rpc-server did not listen on {host}:{self.port} within 30 s")
                time.sleep(0.1)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> "RpcServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Optional[List[str]] = None) -> int:
    """sparq-cpp rpc-server: runs the fork's ggml-rpc-server with the given arguments."""
    exe = server_binary()
    args = list(sys.argv[1:] if argv is None else argv)
    os.execv(str(exe), [str(exe)] + args)
    return 0  # not reached
