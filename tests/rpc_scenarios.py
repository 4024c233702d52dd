"""Scenarios of tests/test_rpc.py, each run in its own Python process: RPC servers registered
with ggml stay registered until the process exits (a later model load would ask a stopped
server for its memory), so the test process itself never registers one.

    python tests/rpc_scenarios.py one|two|unreachable|lost|lost_between   -> one JSON line on stdout
"""

import json
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sparq_cpp import Llama, models  # noqa: E402
from sparq_cpp.rpc import RpcServer, free_port  # noqa: E402
from test_sparq import _teacher_forced, _tokens  # noqa: E402

# 600 prompt tokens, SparQ 1/8 from 256 cells (n_kv 768 > k = 48), 16 teacher-forced tokens
# the F16 K^T mirror: the portable graph's (what RPC layers run), so that local runs with the fused
# op read the same rows as remote ones (the fused op's default int8 mirror buys more rows)
SPARQ = dict(sparq_compression=1 / 8, sparq_min_ctx=256, sparq_realloc=True, sparq_mirror="float")


def _decode(**kw):
    llm = Llama("smollm2-135m", n_ctx=1024, n_batch=512, n_threads=1, logits_all=True, verbose=False, **SPARQ, **kw)
    try:
        toks = _tokens(llm, models.essays_text(8), 616)
        logits = _teacher_forced(llm, toks[:600], toks[600:616])
        return logits, llm.sparq_stats()
    finally:
        llm.close()


# ggml-rpc's request framing (ggml-rpc.cpp): | command (1 byte) | size (8 bytes, little-endian) | data |
RPC_CMD_GRAPH_COMPUTE, RPC_CMD_GRAPH_RECOMPUTE = 10, 16


class _KillOnCompute:
    """A TCP relay in front of an RPC server. Once armed, as soon as the next graph-compute request
    has passed through it, it stops listening, SIGKILLs the server and drops every connection, as a
    crashed machine would: the fault lands inside the batch, after its graph was sent and before
    its result came back, wherever the machine's speed puts the compute."""

    def __init__(self, srv):
        self.srv, self.armed, self.killed = srv, threading.Event(), threading.Event()
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.lsock.accept()
            except OSError:
                return
            server = socket.create_connection((self.srv.host, self.srv.port))
            self.conns += [client, server]
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    @staticmethod
    def _read(sock, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise OSError("closed")
            buf += chunk
        return bytes(buf)

    @staticmethod
    def _end(*socks):
        """One side closed: close both (the server serves one connection at a time)."""
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _pipe(self, src, dst):
        try:
            while chunk := src.recv(1 << 20):
                dst.sendall(chunk)
        except OSError:
            pass
        self._end(src, dst)

    def _requests(self, client, server):
        try:
            while True:
                head = self._read(client, 9)
                cmd, size = head[0], struct.unpack("<Q", head[1:])[0]
                server.sendall(head)
                left = size
                while left:
                    chunk = self._read(client, min(left, 1 << 20))
                    server.sendall(chunk)
                    left -= len(chunk)
                if cmd in (RPC_CMD_GRAPH_COMPUTE, RPC_CMD_GRAPH_RECOMPUTE) and self.armed.is_set():
                    self.killed.set()  # before the client can see the fault
                    # stop listening first: the client notices the fault once the server is gone and
                    # then probes the endpoint (sparq_cpp.rpc.lost_error), which must be refused
                    self._end(self.lsock)
                    self.lsock.close()
                    self.srv.proc.kill()
                    self.srv.proc.wait()
                    self.close()
                    return
        except OSError:
            self._end(client, server)

    def close(self):
        self._end(self.lsock, *self.conns)
        for s in [self.lsock] + self.conns:
            s.close()


def _lost():
    """The server is killed (SIGKILL) while a 512-token batch computes on it (the moment its graph
    has been sent), then the model is used once more: each eval raises, nothing hangs, close() returns."""
    from sparq_cpp.rpc import RpcServerLost

    out = {}
    srv = RpcServer(threads=1)
    relay = _KillOnCompute(srv)
    llm = Llama("smollm2-135m", n_ctx=1024, n_batch=512, n_threads=1, verbose=False,
                rpc_servers=relay.endpoint, n_gpu_layers=-1, **SPARQ)
    toks = _tokens(llm, models.essays_text(8), 600)
    llm.eval(toks[:64])  # the server answers
    relay.armed.set()
    t0 = time.perf_counter()
    try:
        llm.eval(toks[64:576])
        out["mid_batch"] = {"raised": None}
    except RpcServerLost as e:
        out["mid_batch"] = {"raised": type(e).__name__, "message": str(e), "after_s": time.perf_counter() - t0,
                            "is_runtime_error": isinstance(e, RuntimeError)}
    out["killed_in_compute"] = relay.killed.is_set()
    try:  # the model is unusable from here: every decode fails at once
        t0 = time.perf_counter()
        llm.eval(toks[576:577])
        out["next_eval"] = {"raised": None}
    except RpcServerLost as e:
        out["next_eval"] = {"raised": type(e).__name__, "after_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    llm.close()
    out["close_s"] = time.perf_counter() - t0
    relay.close()
    srv.stop()
    return out


def _lost_between():
    """Killed between two decodes, with SIGPIPE at its default as in a C program (Python ignores
    it): the next decode writes to the closed connection and fails, the process lives on. Then a
    model on a new server: ggml still lists the dead one (servers stay registered for the life of
    the process), so loading raises an error that says so instead of aborting."""
    from sparq_cpp.rpc import RpcServerLost

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    out = {}
    srv = RpcServer(threads=1)
    llm = Llama("smollm2-135m", n_ctx=1024, n_batch=512, n_threads=1, verbose=False,
                rpc_servers=srv.endpoint, n_gpu_layers=-1, **SPARQ)
    toks = _tokens(llm, models.essays_text(8), 128)
    llm.eval(toks[:64])
    srv.proc.kill()
    srv.proc.wait()
    try:
        llm.eval(toks[64:128])
        out["between"] = {"raised": None}
    except RpcServerLost as e:
        out["between"] = {"raised": type(e).__name__}
    llm.close()
    srv.stop()
    srv2 = RpcServer(threads=1)
    try:
        Llama("smollm2-135m", n_ctx=1024, verbose=False, rpc_servers=srv2.endpoint, n_gpu_layers=-1)
        out["reload"] = {"raised": None}
    except (ConnectionError, ValueError) as e:
        out["reload"] = {"raised": type(e).__name__, "message": str(e)}
    srv2.stop()
    return out


def main(which):
    if which == "lost":
        return _lost()
    if which == "lost_between":
        return _lost_between()
    if which == "unreachable":
        port = free_port()  # nothing listens there
        try:
            Llama("smollm2-135m", n_ctx=1024, rpc_servers=f"127.0.0.1:{port}", n_gpu_layers=-1, verbose=False, **SPARQ)
            return {"raised": None}
        except ConnectionError as e:
            return {"raised": "ConnectionError", "message": str(e)}
    local, st_local = _decode()
    servers = [RpcServer(threads=1) for _ in range({"one": 1, "two": 2}[which])]
    try:
        remote, st = _decode(rpc_servers=",".join(s.endpoint for s in servers), n_gpu_layers=-1)
    finally:
        for s in servers:
            s.stop()
    return {"max_diff": float(np.abs(remote - local).max()),
            "agreement": float((remote.argmax(-1) == local.argmax(-1)).mean()),
            "local": {k: st_local[k] for k in ("n_tokens_sparq", "n_layers_sparq", "n_layers_ops", "devices")},
            "remote": {k: st[k] for k in ("n_tokens_sparq", "n_layers_sparq", "n_layers_ops", "devices")}}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
