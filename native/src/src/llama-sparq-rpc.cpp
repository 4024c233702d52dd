// sparq-cpp: a decode whose layers ran on an RPC server that went away fails with an error code.
//
// Upstream's ggml-rpc aborts the process when a server stops answering. The fork's ggml-rpc
// (native/patches/rpc/, applied when the RPC backend is built) instead marks the connection lost, completes the outstanding messages
// unsent and fails every later graph on it; it answers "ggml_backend_rpc_lost" through its
// registry. Because ggml-rpc queues commands and reads results asynchronously, a server that dies
// while a batch computes is only noticed when the outputs come back: llama_context::decode asks
// here, after the batch, so that very call returns the error rather than outputs left at zero.

#include "llama-sparq-impl.h"

#include "llama-impl.h"

#include "ggml-backend.h"

#include <cstring>
#include <vector>

typedef bool (*rpc_lost_fn)(ggml_backend_t backend);

bool llama_dev_is_rpc(ggml_backend_dev_t dev) {
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    return reg != nullptr && strcmp(ggml_backend_reg_name(reg), "RPC") == 0;
}

bool llama_rpc_lost(ggml_backend_sched_t sched) {
    std::vector<ggml_backend_t> rpc;
    const int n = sched ? ggml_backend_sched_get_n_backends(sched) : 0;
    for (int i = 0; i < n; ++i) {
        ggml_backend_t backend = ggml_backend_sched_get_backend(sched, i);
        if (llama_dev_is_rpc(ggml_backend_get_device(backend))) {
            rpc.push_back(backend);
        }
    }
    if (rpc.empty()) {
        return false;
    }
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
    auto lost = reg ? (rpc_lost_fn) ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_lost") : nullptr;
    if (lost == nullptr) {
        return false; // an upstream ggml-rpc: it aborts on a lost server by itself
    }
    // wait for the outputs of this batch: a server lost while computing shows up here
    ggml_backend_sched_synchronize(sched);
    for (ggml_backend_t backend : rpc) {
        if (lost(backend)) {
            LLAMA_LOG_ERROR("%s: the RPC server of %s is gone: its layers and cache are lost, reload the model\n",
                            __func__, ggml_backend_name(backend));
            return true;
        }
    }
    return false;
}
