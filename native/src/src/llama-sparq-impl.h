// sparq-cpp: the hooks that upstream's KV cache and graph code call (see native/patches/0004).
#pragma once

#include "llama-graph.h"

class llama_kv_cache;
class llama_kv_cache_context;
struct llama_context;

// Nodes the portable SparQ graph adds to a decode graph (llama_context::graph_max_nodes adds
// them to its budget); LLAMA_SPARQ_OPS_NODES bounds the nodes of one layer and stream.
#define LLAMA_SPARQ_OPS_NODES 128
uint32_t llama_sparq_graph_nodes(const llama_context * ctx);

// K and/or V data of the cache changed outside a ubatch (K-shift, stream copy, state load,
// clear): the K^T mirror / the running V sums are rebuilt before the next use.
void llama_sparq_kv_invalidate(llama_kv_cache * kv, bool k_changed, bool v_changed);

// The SparQ input of one graph, or nullptr when SparQ is off for this cache.
llm_graph_input_sparq * llama_sparq_build_input(
        ggml_context * ctx0,
    llm_graph_result * res,
  const llama_ubatch & ubatch,
 const llama_cparams & cparams,
 const llama_kv_cache_context * mctx);

// Writes k_cur into the layer's K^T mirror, then returns the SparQ attention output
// [n_embd_head_v*n_head, n_tokens], or nullptr when this layer/ubatch takes the dense path.
ggml_tensor * llama_sparq_build_attn(
        ggml_context * ctx0,
         ggml_cgraph * gf,
 llm_graph_input_sparq * inp,
         ggml_tensor * q,
         ggml_tensor * k,
         ggml_tensor * v,
         ggml_tensor * k_cur,
         ggml_tensor * v_cur,
         ggml_tensor * kq_mask,
         ggml_tensor * kq_b,
         ggml_tensor * sinks,
               float   kq_scale,
                 int   il);

// The nodes of a ubatch's graph into out[0], those that compute into out[1] (llama_sparq_graph_size).
void llama_sparq_graph_count(ggml_cgraph * gf, int32_t * out);

// Whether a device is an RPC server's (ggml-rpc).
bool llama_dev_is_rpc(ggml_backend_dev_t dev);

// Whether an RPC server behind one of the scheduler's backends stopped answering; waits for the
// scheduler's outstanding work first (llama_context::decode asks after each batch, and fails it).
bool llama_rpc_lost(ggml_backend_sched_t sched);
