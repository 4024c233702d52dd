// sparq-cpp: how the settings of llama_sparq_set become a plan: r, k and l per layer (the budget
// split), which layers of a context's cache take SparQ, through which path (the fused op or the
// portable graph) and with which K^T mirror, and the checks of the settings. llama-sparq.cpp (the
// C API) plans through it; llama-sparq-graph.cpp resolves each decode's r, k and l with it.
#include "llama-sparq-plan.h"
#include "llama-sparq-kv.h"
#include "llama-sparq-impl.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-dsa.h"
#include "llama-kv-cache-dsa-iswa.h"
#include "llama-kv-cache-dsv4.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache-msa.h"
#include "llama-memory-hybrid.h"
#include "llama-memory-hybrid-idx.h"
#include "llama-memory-hybrid-iswa.h"
#include "llama-memory-recurrent.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>

// Step 2's share of the budget: r mirror elements per position against dense's K and V rows; in
// elements (r/(2d)) for a float mirror, in bytes for an INT8 one, whose cheaper reads buy more
// rows (a float mirror over a Q8_0 cache planned by bytes measured worse: docs/results.md)
static double step2_share(int32_t r, int64_t d, const llama_sparq_bytes * bytes) {
    return bytes != nullptr && bytes->mirror_i8 ? (r*bytes->mirror_elem + bytes->mirror_pos)/bytes->kv_row : r/(2.0*d);
}

bool sparq_compression_fits(const llama_sparq_params & p, int64_t d, const llama_sparq_bytes * bytes) {
    return p.k > 0 || p.compression - step2_share(llama_sparq_resolve(p, d, 1, bytes).r, d, bytes) > 0.0;
}

int32_t sparq_min_ctx(const llama_sparq_params & p) {
    return p.min_ctx == -1 ? LLAMA_SPARQ_DEFAULT_MIN_CTX : p.min_ctx;
}

bool sparq_realloc(const llama_sparq_params & p, int64_t n_head, int64_t n_head_kv) {
    return p.mean_realloc == -1 ? n_head == n_head_kv : p.mean_realloc == 1;
}

bool sparq_realloc(const llama_sparq_params & p, const llama_kv_cache & kv) {
    const auto & hp = cache_internals::hparams(kv);
    const uint32_t il = cache_internals::il(kv, 0);
    return sparq_realloc(p, hp.n_head(il), hp.n_head_kv(il));
}

// the K^T mirror's type: INT8 where the fused op reads the layer and its kernel takes INT8, unless
// a float mirror is asked for or the cache is F32
ggml_type sparq_kt_type(const llama_sparq_params & p, ggml_type type_k, bool fused_takes_i8) {
    return llama_sparq_mirror_type(type_k, fused_takes_i8 && p.mirror == LLAMA_SPARQ_MIRROR_AUTO && type_k != GGML_TYPE_F32);
}

// r, k and l of a layer with head size d, for a cache of n_kv positions
llama_sparq_layer_cfg llama_sparq_resolve(const llama_sparq_params & p, int64_t d, int64_t n_kv, const llama_sparq_bytes * bytes) {
    llama_sparq_layer_cfg c;
    if (p.r > 0) {
        c.r = (int32_t) std::min<int64_t>(p.r, d);
    } else if (p.k > 0) {
        c.r = (int32_t) std::max<int64_t>(1, d/8);
    } else {
        // half of the budget to step 2 (r/(2d) = c/2), half to the exact step (k/S = c/2)
        c.r = (int32_t) std::clamp<int64_t>(std::lround(p.compression*d), 1, d);
    }
    const double share = step2_share(c.r, d, bytes);
    const int32_t min_ctx = sparq_min_ctx(p);
    if (p.k > 0) {
        c.k = p.k;
        c.k_frac = 0.0f;
        // below k/(1 - share) visible positions SparQ would read at least what dense attention reads
        c.min_vis = std::max<int32_t>(min_ctx, share < 1.0 ? (int32_t) std::min<double>(p.k/(1.0 - share), INT32_MAX - 1) + 1 : INT32_MAX);
    } else {
        const double fk = p.compression - share;
        c.k = (int32_t) std::max<int64_t>(1, std::lround(fk*n_kv));
        c.k_frac = (float) std::max(0.0, fk);
        c.min_vis = min_ctx;
    }
    c.l = p.l >= 0 ? std::min(p.l, c.k) : c.k/4;
    c.l_div = p.l >= 0 ? 0 : 4;
    return c;
}

llama_sparq_query_read llama_sparq_read(const llama_sparq_layer_cfg & c, const llama_sparq_bytes & b, int64_t S,
                                        bool fused, double vmean_bytes) {
    llama_sparq_query_read q = { std::min<int64_t>(c.k, S), c.l, 0.0 };
    if (fused && S < c.min_vis) {
        q.k = S, q.l = 0;
    } else if (fused && c.k_frac > 0.0f) {
        q.k = std::clamp<int64_t>(std::lround((double) c.k_frac*S), 1, c.k);
        q.l = c.l_div > 0 ? (int32_t) (q.k/c.l_div) : std::min<int32_t>(c.l, (int32_t) q.k);
    }
    q.bytes = fused && q.k >= S ? S*b.kv_row  // every row, as dense
                                : S*(c.r*b.mirror_elem + b.mirror_pos) + q.k*b.kv_row + vmean_bytes;
    return q;
}

llama_sparq_bytes llama_sparq_layer_bytes(ggml_type type_kt, ggml_type type_k, ggml_type type_v, int64_t d, int64_t dv) {
    const bool i8 = type_kt == GGML_TYPE_I8;
    return { (double) ggml_type_size(type_kt), i8 ? 1.0 : 0.0,
             (double) (ggml_row_size(type_k, d) + ggml_row_size(type_v, dv)), i8 };
}

// the caches of a context that can take SparQ (the full-attention one), and the layer count
llama_kv_cache * sparq_cache(const llama_context * ctx, int32_t * n_layers) {
    llama_memory_i * mem = ctx->get_memory();
    *n_layers = 0;
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        *n_layers = (int32_t) cache_internals::n_layers(*kv);
        return kv;
    }
    // an iswa cache: its full-attention part (sliding-window layers stay dense), both parts counted
    auto base_of = [n_layers](llama_kv_cache_iswa * iswa) {
        *n_layers = (int32_t) (cache_internals::n_layers(*iswa->get_base()) + cache_internals::n_layers(*iswa->get_swa()));
        return iswa->get_base();
    };
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return base_of(iswa);
    }
    // hybrid memory: the attention layers' cache (the recurrent layers have none); not where the
    // model keeps its own sparse-attention index beside it
    if (dynamic_cast<llama_memory_hybrid_idx *>(mem) != nullptr) {
        return nullptr;
    }
    if (auto * hyb = dynamic_cast<llama_memory_hybrid *>(mem)) {
        *n_layers = (int32_t) cache_internals::n_layers(*hyb->get_mem_attn());
        return hyb->get_mem_attn();
    }
    if (auto * hyb = dynamic_cast<llama_memory_hybrid_iswa *>(mem)) {
        return base_of(hyb->get_mem_attn());
    }
    return nullptr;
}

const char * sparq_memory_unsupported(const llama_context * ctx) {
    llama_memory_i * mem = ctx->get_memory();
    if (mem == nullptr) {
        return "the model keeps no KV cache (a non-causal or diffusion model)";
    }
    if (dynamic_cast<llama_memory_recurrent *>(mem) != nullptr) {
        return "recurrent memory: no attention KV cache";
    }
    if (dynamic_cast<llama_kv_cache_dsa *>(mem) != nullptr || dynamic_cast<llama_kv_cache_dsa_iswa *>(mem) != nullptr ||
        dynamic_cast<llama_kv_cache_msa *>(mem) != nullptr || dynamic_cast<llama_kv_cache_dsv4 *>(mem) != nullptr ||
        dynamic_cast<llama_memory_hybrid_idx *>(mem) != nullptr) {
        return "the model's own sparse-attention cache (its indexer already selects the positions each query reads)";
    }
    return "this model's memory is not a plain KV cache";
}

bool sparq_kv_type_ok(ggml_type t) {
    return t == GGML_TYPE_F16 || t == GGML_TYPE_F32 || t == GGML_TYPE_Q8_0;
}

ggml_backend_dev_t sparq_layer_device(const llama_kv_cache & kv, size_t ikv) {
    ggml_tensor * k = cache_internals::k(kv, ikv);
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(k->buffer));
    if (dev == nullptr && ggml_backend_buffer_is_host(k->buffer)) {
        dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    }
    return dev;
}

const char * sparq_heads_unsupported(int64_t n_head, int64_t n_head_kv, int64_t d, int64_t dv) {
    if (n_head_kv <= 0 || n_head % n_head_kv != 0) {
        return "query heads not a whole multiple of the KV heads";
    }
    if (n_head/n_head_kv > GGML_SPARQ_MAX_GROUP) {
        return "more than 64 query heads per KV head (GGML_SPARQ_MAX_GROUP)";
    }
    if (d > GGML_SPARQ_MAX_HEAD_SIZE || dv > GGML_SPARQ_MAX_HEAD_SIZE) {
        return "head size above 512 (GGML_SPARQ_MAX_HEAD_SIZE)";
    }
    return nullptr;
}

// why layer ikv cannot take SparQ, or nullptr
static const char * sparq_layer_unsupported(const llama_kv_cache & kv, size_t ikv) {
    const auto & hp = cache_internals::hparams(kv);
    const uint32_t il = cache_internals::il(kv, ikv);
    ggml_tensor * k = cache_internals::k(kv, ikv);
    ggml_tensor * v = cache_internals::v(kv, ikv);
    if (v == nullptr) {
        return "no V cache (MLA)";
    }
    if (!sparq_kv_type_ok(k->type) || !sparq_kv_type_ok(v->type)) {
        return "KV cache type (F16, F32 and Q8_0 supported)";
    }
    const llama_model & model = cache_internals::model(kv);
    if (hp.attn_soft_cap || model.arch == LLM_ARCH_GROK) {  // Grok caps in its own graph
        return "attention logit soft-capping (tanh on the scores: SparQ's approximate scores would not rank them)";
    }
    if (hp.f_max_alibi_bias != 0.0f) {
        return "ALiBi position biases (added to the scores; SparQ's approximate scores do not carry them)";
    }
    if (const char * why = sparq_heads_unsupported(hp.n_head(il), hp.n_head_kv(il), hp.n_embd_head_k(il), hp.n_embd_head_v(il))) {
        return why;
    }

    if (sparq_layer_device(kv, ikv) == nullptr) {
        return "no device for the layer's buffer";
    }
    return nullptr;
}

// whether layer ikv's cache is on an RPC server (ggml-rpc): its supports_op answers true for
// every op without asking the server, so the client cannot tell a server built with the fused op
// (sparq-cpp's rpc-server) from one without it (upstream's, which would abort on it)
static bool layer_on_rpc(const llama_kv_cache & kv, size_t ikv) {
    return llama_dev_is_rpc(sparq_layer_device(kv, ikv));
}

// whether the backend that holds layer ikv has a kernel for the fused op (else: portable graph)
// with a K^T mirror of type kt_type
static bool layer_has_fused_op(const llama_kv_cache & kv, size_t ikv, ggml_type kt_type) {
    if (layer_on_rpc(kv, ikv)) {
        return false; // the portable graph of standard ops runs on any server
    }
    const auto & hp = cache_internals::hparams(kv);
    const uint32_t il = cache_internals::il(kv, ikv);
    ggml_tensor * k = cache_internals::k(kv, ikv);
    ggml_tensor * v = cache_internals::v(kv, ikv);
    ggml_init_params ip = { 16*ggml_tensor_overhead(), nullptr, true };
    ggml_context_ptr ctx(ggml_init(ip));
    const int64_t d = hp.n_embd_head_k(il), n = 256;
    ggml_tensor * q  = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F32, d, 1, hp.n_head(il), 1);
    ggml_tensor * kk = ggml_new_tensor_4d(ctx.get(), k->type, d, n, hp.n_head_kv(il), 1);
    ggml_tensor * kt = ggml_new_tensor_4d(ctx.get(), kt_type, n, d + (kt_type == GGML_TYPE_I8), hp.n_head_kv(il), 1);
    ggml_tensor * vv = ggml_new_tensor_4d(ctx.get(), v->type, hp.n_embd_head_v(il), n, hp.n_head_kv(il), 1);
    ggml_tensor * vm = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F32, hp.n_embd_head_v(il), hp.n_head_kv(il), 1, 1);
    ggml_tensor * m  = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F16, n, 1, 1, 1);
    ggml_tensor * op = ggml_sparq_attn(ctx.get(), q, kk, kt, vv, vm, m, 1.0f, 8, 32, 8, GGML_SPARQ_REALLOC);
    return ggml_backend_dev_supports_op(sparq_layer_device(kv, ikv), op);
}

// The portable graph's choices for the backend of layer ikv: how it attends to its chosen rows,
// gathered (get_rows, then flash attention over k rows) or in place under a sparse mask (flash
// attention over the cache, the chosen cells finite; LLAMA_SPARQ_OPS_ATTEND=gather|mask
// overrides), and whether it has out_prod.
int32_t sparq_ops_flags(const llama_kv_cache & kv, size_t ikv) {
    bool gather = true;
    if (const char * env = getenv("LLAMA_SPARQ_OPS_ATTEND")) {
        if (strcmp(env, "gather") == 0 || strcmp(env, "mask") == 0) {
            gather = strcmp(env, "gather") == 0;
        } else {
            LLAMA_LOG_WARN("%s: LLAMA_SPARQ_OPS_ATTEND=%s ignored (gather or mask)\n", __func__, env);
        }
    }
    ggml_init_params ip = { 4*ggml_tensor_overhead(), nullptr, true };
    ggml_context_ptr ctx(ggml_init(ip));
    ggml_tensor * a = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, 256, 8);
    ggml_tensor * b = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, 4, 8);
    const bool out_prod = ggml_backend_dev_supports_op(sparq_layer_device(kv, ikv), ggml_out_prod(ctx.get(), a, b));
    return (gather ? GGML_SPARQ_GATHER : 0) | (out_prod ? 0 : GGML_SPARQ_MUL_MAT);
}

int32_t sparq_validate(const llama_sparq_params & p, const llama_kv_cache * kv) {
    if (p.k < 0) {
        return LLAMA_SPARQ_ERR_K;
    }
    if (p.k > 0 && p.compression != 0.0f) {
        return LLAMA_SPARQ_ERR_BOTH;
    }
    if (p.k == 0) {
        if (p.compression == 0.0f) {
            return LLAMA_SPARQ_ERR_K;
        }
        if (!(p.compression > 0.0f && p.compression <= 1.0f)) { // NaN fails too
            return LLAMA_SPARQ_ERR_COMPRESSION;
        }
    }
    if (p.r < 0) {
        return LLAMA_SPARQ_ERR_R;
    }
    if (p.l < -1 || (p.k > 0 && p.l > p.k)) {
        return LLAMA_SPARQ_ERR_L;
    }
    if (p.mean_realloc < -1 || p.mean_realloc > 1) {
        return LLAMA_SPARQ_ERR_REALLOC;
    }
    if (p.min_ctx < -1) {
        return LLAMA_SPARQ_ERR_MIN_CTX;
    }
    if (p.path < LLAMA_SPARQ_PATH_AUTO || p.path > LLAMA_SPARQ_PATH_OPS) {
        return LLAMA_SPARQ_ERR_PATH;
    }
    if (p.mirror < LLAMA_SPARQ_MIRROR_AUTO || p.mirror > LLAMA_SPARQ_MIRROR_FLOAT) {
        return LLAMA_SPARQ_ERR_MIRROR;
    }
    if (p.layer_start < 0 || p.layer_end < -1 || (p.layer_end != -1 && p.layer_end <= p.layer_start)) {
        return LLAMA_SPARQ_ERR_LAYERS;
    }
    if (kv != nullptr) {
        const auto & hp = cache_internals::hparams(*kv);
        if ((uint32_t) p.layer_start >= hp.n_layer() || (p.layer_end != -1 && (uint32_t) p.layer_end > hp.n_layer())) {
            return LLAMA_SPARQ_ERR_LAYERS;
        }
        // (whether a compression leaves room for rows depends on each layer's mirror:
        // sparq_plan_layers checks it)
        for (size_t ikv = 0; ikv < cache_internals::n_layers(*kv); ++ikv) {
            if (p.r > hp.n_embd_head_k(cache_internals::il(*kv, ikv))) {
                return LLAMA_SPARQ_ERR_R;
            }
        }
    }
    return LLAMA_SPARQ_OK;
}


sparq_layers sparq_plan_layers(const llama_kv_cache & kv, const llama_sparq_params & p) {
    const auto & hp = cache_internals::hparams(kv);
    const int32_t layer_end = p.layer_end == -1 ? (int32_t) hp.n_layer() : p.layer_end;
    const size_t n_layers = cache_internals::n_layers(kv);
    sparq_layers out;
    out.eligible.assign(n_layers, false);
    out.ops.assign(n_layers, false);
    out.kt_types.assign(n_layers, GGML_TYPE_COUNT);
    for (size_t ikv = 0; ikv < n_layers; ++ikv) {
        const int32_t il = (int32_t) cache_internals::il(kv, ikv);
        if (il < p.layer_start || il >= layer_end) {
            continue;
        }
        const char * why = sparq_layer_unsupported(kv, ikv);
        bool ops = false;
        if (why == nullptr && p.path != LLAMA_SPARQ_PATH_OPS) {
            ops = !layer_has_fused_op(kv, ikv, llama_sparq_mirror_type(cache_internals::k(kv, ikv)->type, false));
            if (ops && p.path == LLAMA_SPARQ_PATH_FUSED) {
                why = layer_on_rpc(kv, ikv) ? "the layer is on an RPC server, which cannot say whether it has the fused SparQ kernel (path = fused)"
                                            : "the layer's backend has no fused SparQ kernel (path = fused)";
            }
        } else if (why == nullptr) {
            ops = true;
        }
        if (why != nullptr) {
            out.refused.emplace_back(il, why);
            continue;
        }
        out.eligible[ikv] = true;
        out.ops[ikv] = ops;
        const ggml_type type_k = cache_internals::k(kv, ikv)->type;
        out.kt_types[ikv] = sparq_kt_type(p, type_k, !ops && layer_has_fused_op(kv, ikv, GGML_TYPE_I8));
        // room for rows after step 2, per mirror
        const ggml_tensor * k = cache_internals::k(kv, ikv), * v = cache_internals::v(kv, ikv);
        const int64_t d = hp.n_embd_head_k(il);
        const llama_sparq_bytes b = llama_sparq_layer_bytes(out.kt_types[ikv], k->type, v->type, d, hp.n_embd_head_v(il));
        out.compression_too_small = out.compression_too_small || !sparq_compression_fits(p, d, &b);
    }
    return out;
}

// One layer that takes SparQ, for a sequence of n_pos positions: path, r, k, l and bytes as the
// decode's counters count them (llama_sparq_resolve, llama_sparq_read). llama_sparq_plan and
// llama_sparq_plan_layer both plan through it.
void sparq_plan_layer(const llama_sparq_params & p, int64_t d, int64_t dv, int64_t n_head_kv, ggml_type type_k,
                       ggml_type type_v, ggml_type type_kt, bool fused, bool realloc, int32_t n_pos,
                       llama_sparq_layer_plan & o) {
    o.bytes_dense = (double) n_pos * n_head_kv * (ggml_row_size(type_k, d) + ggml_row_size(type_v, dv));
    o.path = 0, o.r = 0, o.k = n_pos, o.l = 0, o.type_kt = -1, o.bytes = o.bytes_dense;
    // a decode takes SparQ from min_ctx positions on, and a fixed k below the cache's length
    if (n_pos < sparq_min_ctx(p) || (p.k > 0 && p.k >= n_pos)) {
        return;
    }
    const llama_sparq_bytes b = llama_sparq_layer_bytes(type_kt, type_k, type_v, d, dv);
    const llama_sparq_layer_cfg c = llama_sparq_resolve(p, d, n_pos, &b);
    if (fused && n_pos < c.min_vis) {
        return;
    }
    const llama_sparq_query_read q = llama_sparq_read(c, b, n_pos, fused, realloc ? dv*sizeof(float) : 0.0);
    o.path = fused ? 1 : 2;
    o.r = c.r, o.k = (int32_t) q.k, o.l = q.l, o.type_kt = (int32_t) type_kt;
    o.bytes = n_head_kv*q.bytes;
}
