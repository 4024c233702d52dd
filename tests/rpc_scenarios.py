"""Scenarios of tests/test_rpc.py, each run in its own Python process: RPC servers registered
with ggml stay registered until the process exits (a later model load would ask a stopped
server for its memory), so the test process itself never registers one.

    python tests/rpc_scenarios.py one|two|unreachable   -> one JSON line on stdout
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sparq_cpp import Llama, models  # noqa: E402
from sparq_cpp.rpc import RpcServer, free_port  # noqa: E402
from test_sparq import _teacher_forced, _tokens  # noqa: E402

# 600 prompt tokens, SparQ 1/8 from 256 cells (n_kv 768 > k = 48), 16 teacher-forced tokens
SPARQ = dict(sparq_compression=1 / 8, sparq_min_ctx=256, sparq_realloc=True)


def _decode(**kw):
    llm = Llama("smollm2-135m", n_ctx=1024, n_batch=512, n_threads=1, logits_all=True, verbose=False, **SPARQ, **kw)
    try:
        toks = _tokens(llm, models.essays_text(8), 616)
        logits = _teacher_forced(llm, toks[:600], toks[600:616])
        return logits, llm.sparq_stats()
    finally:
        llm.close()


def main(which):
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
