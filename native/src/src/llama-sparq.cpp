// sparq-cpp: the C API of SparQ in libllama (llama-sparq.h): turning it on and off, its plan, its
// counters. How settings become a plan lives in llama-sparq-plan.cpp, the per-cache state in
// llama-sparq-kv.cpp, the decode graph in llama-sparq-graph.cpp. Spec: docs/sparq.md.
#include "llama-sparq.h"
#include "llama-sparq-kv.h"
#include "llama-sparq-impl.h"
#include "llama-sparq-plan.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#ifndef SPARQ_CPP_VERSION
#define SPARQ_CPP_VERSION "0.1.0"
#endif
#ifndef SPARQ_UPSTREAM_COMMIT
#define SPARQ_UPSTREAM_COMMIT "0c1e570"
#endif

// why the last llama_sparq_set of this thread left decoding dense (llama_sparq_dense_reason)
static thread_local std::string g_dense_reason;

const char * llama_sparq_dense_reason(void) {
    return g_dense_reason.c_str();
}

const char * llama_sparq_version(void) {
    return "sparq-cpp " SPARQ_CPP_VERSION " (llama.cpp " SPARQ_UPSTREAM_COMMIT ")";
}

int32_t llama_sparq_params_check(const struct llama_sparq_params * params) {
    return params == nullptr ? LLAMA_SPARQ_ERR_NULL : sparq_validate(*params, nullptr);
}

struct llama_sparq_params llama_sparq_default_params(void) {
    llama_sparq_params p;
    p.k           = 0;
    p.compression = 0.125f;
    p.r           = 0;
    p.l           = -1;
    p.mean_realloc = -1;
    p.min_ctx     = -1;
    p.layer_start = 0;
    p.layer_end   = -1;
    p.no_tau      = false;
    p.path        = LLAMA_SPARQ_PATH_AUTO;
    p.mirror      = LLAMA_SPARQ_MIRROR_AUTO;
    return p;
}

const char * llama_sparq_strerror(int32_t status) {
    switch (status) {
        case LLAMA_SPARQ_OK:              return "ok";
        case LLAMA_SPARQ_DENSE:           return "SparQ cannot run with this model, cache or context (llama_sparq_dense_reason); decoding stays dense";
        case LLAMA_SPARQ_ROTATED:         return "the cache already holds Hadamard-rotated keys";
        case LLAMA_SPARQ_ERR_NULL:        return "context is NULL";
        case LLAMA_SPARQ_ERR_K:           return "k must be >= 1 (or 0 with a compression)";
        case LLAMA_SPARQ_ERR_COMPRESSION: return "compression must be in (0, 1] and leave room for rows after step 2's r components (r/(2*head size) with a float mirror)";
        case LLAMA_SPARQ_ERR_BOTH:        return "give k or compression, not both";
        case LLAMA_SPARQ_ERR_R:           return "r must be in 1..head size (0: default)";
        case LLAMA_SPARQ_ERR_L:           return "l must be in 0..k (-1: default k/4)";
        case LLAMA_SPARQ_ERR_REALLOC:     return "mean_realloc must be -1, 0 or 1";
        case LLAMA_SPARQ_ERR_MIN_CTX:     return "min_ctx must be >= 0 (-1: default)";
        case LLAMA_SPARQ_ERR_LAYERS:      return "layer range is empty or outside the model";
        case LLAMA_SPARQ_ERR_V_TRANS:     return "the context stores V transposed: create it with flash attention enabled";
        case LLAMA_SPARQ_ERR_ALLOC:       return "could not allocate the K^T mirror";
        case LLAMA_SPARQ_ERR_PATH:        return "path must be 0 (auto), 1 (fused) or 2 (ops)";
        case LLAMA_SPARQ_ERR_MIRROR:      return "mirror must be 0 (auto) or 1 (float)";
        case LLAMA_SPARQ_ERR_SHAPE:       return "the layer's shape is out of range: head counts (a multiple, at most 64 query heads per KV head), head sizes (1..512), cache types (f16, f32, q8_0) or n_pos";
    }
    return "unknown status";
}

// A quantized cache makes upstream rotate Q and K by a Hadamard matrix, which spreads q's mass
// evenly over the components; step 1 keeps the r largest |q_i| and relies on that mass being
// uneven. Measured (experiments/eval_kv_rotation.py, SmolLM2, q8_0, 1/8): KL to dense 0.074 with
// the rotation, 0.023 without; dense q8_0 itself is no worse without it. The rotation is the
// cache's (K is stored rotated), so it can only be dropped while the cache holds nothing.
static int32_t sparq_prepare_cache(llama_kv_cache & kv, const char * caller) {
    if (!cache_internals::attn_rot_k(kv)) {
        return LLAMA_SPARQ_OK;
    }
    bool empty = true;
    for (uint32_t s = 0; s < kv.get_n_stream(); ++s) {
        empty = empty && cache_internals::cells(kv, s).get_used() == 0;
    }
    if (empty) {
        cache_internals::attn_rot_k(kv) = false;
        LLAMA_LOG_INFO("%s: Hadamard rotation of Q and K turned off for this cache (it spreads q over "
                "all components, which SparQ's component choice relies on not happening)\n", caller);
        return LLAMA_SPARQ_OK;
    }
    LLAMA_LOG_WARN("%s: the cache already holds Hadamard-rotated keys, so SparQ picks components "
            "in the rotated basis (less accurate); set SparQ before the first decode, or set "
            "LLAMA_ATTN_ROT_DISABLE=1, to keep the rotation off\n", caller);
    return LLAMA_SPARQ_ROTATED;
}

int32_t llama_sparq_prepare_cache(struct llama_context * ctx) {
    if (ctx == nullptr) {
        return LLAMA_SPARQ_ERR_NULL;
    }
    int32_t n_layers = 0;
    llama_kv_cache * kv = sparq_cache(ctx, &n_layers);
    if (kv == nullptr || cache_internals::shares_cells(*kv)) {
        return LLAMA_SPARQ_DENSE;
    }
    return sparq_prepare_cache(*kv, __func__);
}

int32_t llama_sparq_set(struct llama_context * ctx, const struct llama_sparq_params * params) {
    if (ctx == nullptr) {
        return LLAMA_SPARQ_ERR_NULL;
    }
    g_dense_reason.clear();
    int32_t n_layers_all = 0;
    llama_kv_cache * kv = sparq_cache(ctx, &n_layers_all);

    if (params == nullptr) {
        if (kv != nullptr && kv->sparq && kv->sparq->enabled) {
            auto & st = *kv->sparq;
            st.enabled = false;
            st.free_mirror();
            st.reset_sums();
            st.generation++;
            ctx->sparq_need_reserve();
        }
        return LLAMA_SPARQ_OK;
    }

    const int32_t err = sparq_validate(*params, kv);
    if (err != LLAMA_SPARQ_OK) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_sparq_strerror(err));
        return err;
    }
    if (kv == nullptr || cache_internals::shares_cells(*kv)) {
        g_dense_reason = kv == nullptr ? sparq_memory_unsupported(ctx) : "the KV cache shares its cells with another cache";
        LLAMA_LOG_WARN("%s: %s; decoding stays dense\n", __func__, g_dense_reason.c_str());
        return LLAMA_SPARQ_DENSE;
    }

    // which layers can take SparQ, and whether the compression leaves room for rows
    const size_t n_layers = cache_internals::n_layers(*kv);
    const sparq_layers lay = sparq_plan_layers(*kv, *params);
    // V stored transposed (flash attention off) is the caller's to change, where a layer could
    // take SparQ at all (a model none of whose layers can is dense below, whatever its V layout)
    if (cache_internals::v_trans(*kv) && lay.any_eligible()) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_sparq_strerror(LLAMA_SPARQ_ERR_V_TRANS));
        return LLAMA_SPARQ_ERR_V_TRANS;
    }
    if (lay.compression_too_small) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_sparq_strerror(LLAMA_SPARQ_ERR_COMPRESSION));
        return LLAMA_SPARQ_ERR_COMPRESSION;
    }
    const std::vector<bool> & eligible = lay.eligible;
    const std::vector<bool> & ops = lay.ops;
    const std::vector<ggml_type> & kt_types = lay.kt_types;
    // a context shorter than min_ctx per sequence would never take SparQ: say so, allocate nothing
    const int32_t min_ctx = sparq_min_ctx(*params);
    std::string reason;
    if (!lay.any_eligible()) {
        const char * none = cache_internals::n_layers(*kv) == 0
            ? "every attention layer is sliding-window or chunked: their own short cache, dense by design"
            : "none in the layer range";
        reason = std::string("no layer can use SparQ (") + (lay.refused.empty() ? none : lay.describe_refused()) + ")";
    } else if (kv->get_size() < (uint32_t) min_ctx) {
        reason = "the context holds " + std::to_string(kv->get_size()) + " positions per sequence, fewer than min_ctx " +
                 std::to_string(min_ctx) + " (the sequence length from which SparQ replaces dense attention)";
    }
    if (!reason.empty()) {
        if (kv->sparq && kv->sparq->enabled) {
            llama_sparq_set(ctx, nullptr);
        }
        g_dense_reason = reason;
        LLAMA_LOG_WARN("%s: %s; decoding stays dense\n", __func__, reason.c_str());
        return LLAMA_SPARQ_DENSE;
    }

    if (!kv->sparq) {
        kv->sparq = std::make_shared<llama_sparq_kv>();
    }
    auto & st = *kv->sparq;

    bool same_layers = st.enabled && st.kt.size() == n_layers;
    for (size_t ikv = 0; same_layers && ikv < n_layers; ++ikv) {
        same_layers = (st.kt[ikv] != nullptr) == eligible[ikv] && (st.kt[ikv] == nullptr || st.kt[ikv]->type == kt_types[ikv]);
    }
    if (!same_layers && !st.allocate(*kv, kt_types)) {
        st.enabled = false;
        LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_sparq_strerror(LLAMA_SPARQ_ERR_ALLOC));
        return LLAMA_SPARQ_ERR_ALLOC;
    }

    st.ops = ops;
    st.n_ops = (int32_t) std::count(ops.begin(), ops.end(), true);
    st.ops_flags.assign(ops.size(), 0);
    for (size_t ikv = 0; ikv < ops.size(); ++ikv) {
        st.ops_flags[ikv] = ops[ikv] ? sparq_ops_flags(*kv, ikv) : 0;
    }

    const bool realloc = sparq_realloc(*params, *kv);
    if (realloc && !st.realloc) {
        st.v_dirty = true; // the sums were not kept up to date while reallocation was off
    }
    sparq_prepare_cache(*kv, __func__);

    st.params   = *params;
    st.realloc  = realloc;
    st.min_ctx  = min_ctx;
    st.enabled  = true;
    st.generation++;
    ctx->sparq_need_reserve();

    if (!lay.refused.empty()) {  // once per setting, not per token: which layers stay dense, and why
        g_dense_reason = "SparQ on " + std::to_string(st.n_eligible) + " of " + std::to_string(n_layers_all) +
                         " attention layers; dense: " + lay.describe_refused();
        LLAMA_LOG_WARN("%s: %s\n", __func__, g_dense_reason.c_str());
    }
    const long n_i8 = std::count(kt_types.begin(), kt_types.end(), GGML_TYPE_I8);
    LLAMA_LOG_INFO("%s: SparQ on %d of %d attention layers, %d of them through the portable graph, %ld with an int8 K^T mirror (%s %g, r %d, l %d, reallocation %s, from %d positions)\n",
            __func__, st.n_eligible, n_layers_all, st.n_ops, n_i8, params->k > 0 ? "k" : "compression",
            params->k > 0 ? (double) params->k : (double) params->compression, params->r, params->l,
            realloc ? "on" : "off", st.min_ctx);
    return LLAMA_SPARQ_OK;
}

int32_t llama_sparq_plan(const struct llama_context * ctx, const struct llama_sparq_params * params,
                         int32_t n_pos, struct llama_sparq_layer_plan * out, int32_t n_max) {
    if (ctx == nullptr || params == nullptr || n_pos < 0 || (out == nullptr && n_max > 0)) {
        return LLAMA_SPARQ_ERR_NULL;
    }
    int32_t n_layers_all = 0;
    const llama_kv_cache * kv = sparq_cache(ctx, &n_layers_all);
    const int32_t err = sparq_validate(*params, kv);
    if (err != LLAMA_SPARQ_OK) {
        return err;
    }
    if (kv == nullptr || cache_internals::shares_cells(*kv)) {
        return 0;
    }
    const sparq_layers lay = sparq_plan_layers(*kv, *params);
    if (cache_internals::v_trans(*kv) && lay.any_eligible()) {
        return LLAMA_SPARQ_ERR_V_TRANS;
    }
    if (lay.compression_too_small) {
        return LLAMA_SPARQ_ERR_COMPRESSION;
    }
    const auto & hp = cache_internals::hparams(*kv);
    const int32_t n_layers = (int32_t) cache_internals::n_layers(*kv);
    const bool realloc = sparq_realloc(*params, *kv);
    for (int32_t ikv = 0; ikv < n_layers && ikv < n_max; ++ikv) {
        const int32_t il = (int32_t) cache_internals::il(*kv, ikv);
        const ggml_type type_k = cache_internals::k(*kv, ikv)->type, type_v = cache_internals::v(*kv, ikv)->type;
        llama_sparq_layer_plan & o = out[ikv];
        o.il = il;
        // a layer that cannot take SparQ plans as one below min_ctx: dense
        llama_sparq_params p = *params;
        if (!lay.eligible[ikv]) {
            p.min_ctx = INT32_MAX;
        }
        sparq_plan_layer(p, hp.n_embd_head_k(il), hp.n_embd_head_v(il), hp.n_head_kv(il), type_k, type_v,
                   lay.kt_types[ikv], !lay.ops[ikv], realloc, n_pos, o);
    }
    return n_layers;
}

int32_t llama_sparq_plan_layer(const struct llama_sparq_params * params, int32_t n_head, int32_t n_head_kv,
                               int32_t d, int32_t dv, enum ggml_type type_k, enum ggml_type type_v, bool fused,
                               int32_t n_pos, struct llama_sparq_layer_plan * out) {
    if (params == nullptr || out == nullptr) {
        return LLAMA_SPARQ_ERR_NULL;
    }
    if (n_head < 1 || d < 1 || dv < 1 || n_pos < 0 || sparq_heads_unsupported(n_head, n_head_kv, d, dv) != nullptr ||
        !sparq_kv_type_ok(type_k) || !sparq_kv_type_ok(type_v)) {
        return LLAMA_SPARQ_ERR_SHAPE;
    }
    const int32_t err = sparq_validate(*params, nullptr);
    if (err != LLAMA_SPARQ_OK) {
        return err;
    }
    if (params->r > d) {
        return LLAMA_SPARQ_ERR_R;
    }
    // the mirror as llama_sparq_set chooses it for a layer on the CPU (whose fused op takes INT8)
    const ggml_type type_kt = sparq_kt_type(*params, type_k, fused);
    const llama_sparq_bytes b = llama_sparq_layer_bytes(type_kt, type_k, type_v, d, dv);
    if (!sparq_compression_fits(*params, d, &b)) {
        return LLAMA_SPARQ_ERR_COMPRESSION;
    }
    out->il = 0;
    sparq_plan_layer(*params, d, dv, n_head_kv, type_k, type_v, type_kt, fused, sparq_realloc(*params, n_head, n_head_kv), n_pos, *out);
    return LLAMA_SPARQ_OK;
}

int32_t llama_sparq_get(const struct llama_context * ctx, struct llama_sparq_params * params) {
    if (ctx == nullptr) {
        return LLAMA_SPARQ_ERR_NULL;
    }
    int32_t n_layers = 0;
    const llama_kv_cache * kv = sparq_cache(ctx, &n_layers);
    if (kv == nullptr || !kv->sparq || !kv->sparq->enabled) {
        return 0;
    }
    if (params != nullptr) {
        *params = kv->sparq->params;
    }
    return 1;
}

int32_t llama_sparq_stats_get(const struct llama_context * ctx, struct llama_sparq_stats * stats) {
    if (ctx == nullptr || stats == nullptr) {
        return LLAMA_SPARQ_ERR_NULL;
    }
    int32_t n_layers = 0;
    const llama_kv_cache * kv = sparq_cache(ctx, &n_layers);
    *stats = {};
    if (kv != nullptr && kv->sparq) {
        const auto & st = *kv->sparq;
        *stats = st.stats;
        stats->n_layers_sparq = st.enabled ? st.n_eligible : 0;
        stats->n_layers_ops   = st.enabled ? st.n_ops : 0;
        stats->extra_bytes = st.extra_bytes();
    }
    stats->n_layers = n_layers;
    return LLAMA_SPARQ_OK;
}

const char * llama_sparq_layer_device(const struct llama_context * ctx, int32_t il) {
    if (ctx == nullptr) {
        return nullptr;
    }
    int32_t n_layers = 0;
    const llama_kv_cache * kv = sparq_cache(ctx, &n_layers);
    if (kv == nullptr || !kv->sparq || !kv->sparq->enabled) {
        return nullptr;
    }
    const int32_t ikv = cache_internals::ikv(*kv, il);
    if (ikv < 0 || (size_t) ikv >= kv->sparq->kt.size() || kv->sparq->kt[ikv] == nullptr) {
        return nullptr;
    }
    ggml_backend_dev_t dev = sparq_layer_device(*kv, ikv);
    return dev ? ggml_backend_dev_name(dev) : nullptr;
}

// graph nodes the portable graph adds (llama_context::graph_max_nodes): per layer that runs it
// and per stream of a ubatch (each stream gets its own copy of the graph)
uint32_t llama_sparq_graph_nodes(const llama_context * ctx) {
    int32_t n_layers = 0;
    const llama_kv_cache * kv = sparq_cache(ctx, &n_layers);
    if (kv == nullptr || !kv->sparq || !kv->sparq->enabled) {
        return 0;
    }
    // and per stream, headroom for what the graph's SparQ input adds once (the V sums, their
    // counts, the window ranks, an index input per K width, and their views)
    const uint32_t input_nodes = 64;
    return (uint32_t) kv->sparq->n_ops*kv->get_n_stream()*LLAMA_SPARQ_OPS_NODES + input_nodes*kv->get_n_stream();
}

// "compute": not one of the ops ggml_op_is_empty names (ggml-impl.h, private to ggml, so not
// callable from libllama)
void llama_sparq_graph_count(ggml_cgraph * gf, int32_t * out) {
    const int n = ggml_graph_n_nodes(gf);
    int32_t n_compute = 0;
    for (int i = 0; i < n; ++i) {
        switch (ggml_graph_node(gf, i)->op) {
            case GGML_OP_NONE: case GGML_OP_VIEW: case GGML_OP_RESHAPE: case GGML_OP_PERMUTE: case GGML_OP_TRANSPOSE:
                break;
            default:
                n_compute++;
        }
    }
    out[0] = n;
    out[1] = n_compute;
}

int32_t llama_sparq_graph_size(const struct llama_context * ctx, int32_t * n_compute) {
    if (ctx == nullptr) {
        return -1;
    }
    if (n_compute != nullptr) {
        *n_compute = ctx->sparq_graph_size[1];
    }
    return ctx->sparq_graph_size[0];
}

void llama_sparq_stats_reset(struct llama_context * ctx) {
    if (ctx == nullptr) {
        return;
    }
    int32_t n_layers = 0;
    llama_kv_cache * kv = sparq_cache(ctx, &n_layers);
    if (kv != nullptr && kv->sparq) {
        kv->sparq->stats = {};
    }
}

int64_t llama_sparq_check(const struct llama_context * ctx, float * max_rel_err_v) {
    if (ctx == nullptr) {
        return -1;
    }
    if (max_rel_err_v != nullptr) {
        *max_rel_err_v = 0.0f;
    }
    int32_t n_layers = 0;
    const llama_kv_cache * kv = sparq_cache(ctx, &n_layers);
    if (kv == nullptr || !kv->sparq || !kv->sparq->enabled) {
        return 0;
    }
    return kv->sparq->check(*kv, max_rel_err_v);
}
