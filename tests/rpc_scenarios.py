"""Scenarios of tests/test_rpc.py, each run in its own Python process: RPC servers registered
with ggml stay registered until the process exits (a later model load would ask a stopped
server for its memory), so the test process itself never registers one.

    python tests/rpc_scenarios.py one|two|unreachable|lost|lost_between   -> one JSON line on stdout
"""

import json
import signal
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


def _lost():
    """The server is killed (SIGKILL) while a 512-token batch computes on it, then once more
    between two decodes of a second model: each eval raises, nothing hangs, close() returns."""
    from sparq_cpp.rpc import RpcServerLost

    out = {}
    srv = RpcServer(threads=1)
    llm = Llama("smollm2-135m", n_ctx=1024, n_batch=512, n_threads=1, verbose=False,
                rpc_servers=srv.endpoint, n_gpu_layers=-1, **SPARQ)
    toks = _tokens(llm, models.essays_text(8), 600)
    times = []
    for _ in range(2):  # one 512-token batch on a 1-thread server, twice: the faster counts
        llm.reset()
        llm.eval(toks[:64])  # the server answers
        t0 = time.perf_counter()
        llm.eval(toks[64:576])
        times.append(time.perf_counter() - t0)
    out["batch_s"] = min(times)
    llm.reset()
    llm.eval(toks[:64])
    # a fifth into the next one: early enough that the batch is still running on a loaded
    # machine whose speed moves between batches (a third missed it once, under two other jobs)
    killer = threading.Timer(out["batch_s"] / 5, srv.proc.kill)
    killer.start()
    t0 = time.perf_counter()
    try:
        llm.eval(toks[64:576])
        out["mid_batch"] = {"raised": None}
    except RpcServerLost as e:
        out["mid_batch"] = {"raised": type(e).__name__, "message": str(e), "after_s": time.perf_counter() - t0,
                            "is_runtime_error": isinstance(e, RuntimeError)}
    killer.join()
    srv.proc.wait()
    try:  # the model is unusable from here: every decode fails at once
        t0 = time.perf_counter()
        llm.eval(toks[576:577])
        out["next_eval"] = {"raised": None}
    except RpcServerLost as e:
        out["next_eval"] = {"raised": type(e).__name__, "after_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    llm.close()
    out["close_s"] = time.perf_counter() - t0
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
