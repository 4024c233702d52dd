// sparq-cpp: SparQ attention in libllama: the K^T mirror and running V sums of a KV cache, the
// graph input and branch that put GGML_OP_SPARQ_ATTN into decoding, and the C API.
//
// How the pieces stay consistent (see ../shared/SPARQ.md and the README):
// - The K^T mirror (positions contiguous per component) of every SparQ layer is written by the
//   same graph that writes K (one ggml_set_rows per layer, element rows as upstream's
//   transposed V), in every ubatch while SparQ is set. Anything else that changes K (K-shift,
//   stream copy, state load) marks it stale, and it is rebuilt from K before the next graph.
// - The running V sum of a sequence is the sum of V over a tracked set of cells, kept in fp64 on
//   the host and handed to the op in fp32. Before a SparQ ubatch the set is brought to "cells of
//   the sequence at positions <= the new token's", adding and subtracting rows; a cell's row is
//   subtracted before any ubatch overwrites it, so what is subtracted is always what was added.
//   Sequence operations need no hook (they only change cell metadata); freed cells leave the
//   sum at the next sync. The new token's own V is added inside the graph.
#include "llama-sparq.h"
#include "llama-sparq-impl.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#ifndef SPARQ_CPP_VERSION
#define SPARQ_CPP_VERSION "0.1.0"
#endif
#ifndef SPARQ_UPSTREAM_COMMIT
#define SPARQ_UPSTREAM_COMMIT "0c1e570"
#endif

// Default cache length from which SparQ replaces dense attention (measured: README, "min_ctx").
static constexpr int32_t SPARQ_DEFAULT_MIN_CTX = 512;

const char * llama_sparq_version(void) {
    return "sparq-cpp " SPARQ_CPP_VERSION " (llama.cpp " SPARQ_UPSTREAM_COMMIT ")";
}

//
// state of one KV cache
//

struct llama_sparq_kv {
    bool enabled = false;
    llama_sparq_params params = {};  // as given by the user
    bool     realloc = false;        // resolved
    int32_t  min_ctx = 0;            // resolved
    uint32_t generation = 0;         // bumped on every change: graphs built before are not reused

    // per cache layer (index of llama_kv_cache::layers)
    std::vector<ggml_tensor *> kt;   // K^T mirror [kv_size, n_embd_k_gqa, n_stream], null: layer stays dense
    std::vector<size_t> vsum_off;    // offset of the layer's V sum in a sequence's sum vector
    int32_t n_eligible = 0;
    int64_t n_embd_kt  = 0;          // n_embd_k_gqa, the same for every SparQ layer
    size_t  vsum_size  = 0;
    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> ctxs_bufs;

    bool k_dirty = true;             // mirror must be rebuilt from K
    bool v_dirty = true;             // V sums must be rebuilt

    std::vector<std::vector<uint8_t>> in_sum; // [seq][cell]: the cell's V row is in the seq's sum
    std::vector<std::vector<double>>  vsum;   // [seq][vsum_size], fp64: a running fp32 sum drifts
                                             // (2e-4 relative after 8k near-constant rows)
    std::vector<int64_t>              count;  // [seq]: cells in the sum
    std::vector<uint32_t>             hi;     // [seq]: cells >= hi are not in the sum

    llama_sparq_stats stats = {};

    void free_mirror() {
        kt.clear();
        vsum_off.clear();
        ctxs_bufs.clear();
        n_eligible = 0;
        n_embd_kt  = 0;
        vsum_size  = 0;
    }

    void reset_sums() {
        in_sum.clear();
        vsum.clear();
        count.clear();
        hi.clear();
    }
};

// private members of upstream's cache, for this file only (friend in llama-kv-cache.h)
struct llama_sparq_access {
    static const llama_hparams & hparams(const llama_kv_cache & kv) { return kv.hparams; }
    static bool v_trans(const llama_kv_cache & kv) { return kv.v_trans; }
    static size_t n_layers(const llama_kv_cache & kv) { return kv.layers.size(); }
    static uint32_t il(const llama_kv_cache & kv, size_t ikv) { return kv.layers[ikv].il; }
    static ggml_tensor * k(const llama_kv_cache & kv, size_t ikv) { return kv.layers[ikv].k; }
    static ggml_tensor * v(const llama_kv_cache & kv, size_t ikv) { return kv.layers[ikv].v; }
    static int32_t ikv(const llama_kv_cache & kv, int32_t il) {
        auto it = kv.map_layer_ids.find(il);
        return it == kv.map_layer_ids.end() ? -1 : it->second;
    }
    static const llama_kv_cells & cells(const llama_kv_cache & kv, uint32_t strm) { return kv.v_cells[strm]; }
    static bool shares_cells(const llama_kv_cache & kv) { return kv.other != nullptr; }
    static bool & attn_rot_k(llama_kv_cache & kv) { return kv.attn_rot_k; }

    static llama_kv_cache * kv(const llama_kv_cache_context * mctx) { return mctx->kv; }
    static const llama_kv_cache::slot_info & sinfo(const llama_kv_cache_context * mctx) { return mctx->sinfos[mctx->i_cur]; }
};

using A = llama_sparq_access;

void llama_sparq_kv_invalidate(llama_kv_cache * kv, bool k_changed, bool v_changed) {
    if (kv == nullptr || !kv->sparq) {
        return;
    }
    kv->sparq->k_dirty |= k_changed;
    kv->sparq->v_dirty |= v_changed;
}

//
// settings
//

struct sparq_layer_cfg {
    int32_t r;
    int32_t k;
    int32_t l;
};

// r, k and l of a layer with head size d, for a cache of n_kv positions
static sparq_layer_cfg sparq_resolve(const llama_sparq_params & p, int64_t d, int64_t n_kv) {
    sparq_layer_cfg c;
    if (p.r > 0) {
        c.r = (int32_t) std::min<int64_t>(p.r, d);
    } else if (p.k > 0) {
        c.r = (int32_t) std::max<int64_t>(1, d/8);
    } else {
        // half of the budget to step 2 (r/(2d) = c/2), half to the exact step (k/S = c/2)
        c.r = (int32_t) std::clamp<int64_t>(std::lround(p.compression*d), 1, d);
    }
    if (p.k > 0) {
        c.k = p.k;
    } else {
        const double fk = p.compression - c.r/(2.0*d);
        c.k = (int32_t) std::max<int64_t>(1, std::lround(fk*n_kv));
    }
    c.l = p.l >= 0 ? std::min(p.l, c.k) : c.k/4;
    return c;
}

// the caches of a context that can take SparQ (the full-attention one), and the layer count
static llama_kv_cache * sparq_cache(const llama_context * ctx, int32_t * n_layers) {
    llama_memory_i * mem = ctx->get_memory();
    *n_layers = 0;
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        *n_layers = (int32_t) A::n_layers(*kv);
        return kv;
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        *n_layers = (int32_t) (A::n_layers(*iswa->get_base()) + A::n_layers(*iswa->get_swa()));
        return iswa->get_base(); // sliding-window layers stay dense
    }
    return nullptr;
}

// the K^T mirror's type: F32 for an F32 cache, F16 otherwise (a quantized K's mirror cannot be
// written one element at a time, and step 2 only needs approximate scores)
static ggml_type sparq_mirror_type(ggml_type type_k) {
    return type_k == GGML_TYPE_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
}

static bool sparq_kv_type_ok(ggml_type t) {
    return t == GGML_TYPE_F16 || t == GGML_TYPE_F32 || t == GGML_TYPE_Q8_0;
}

// n_rows contiguous K or V rows of n values each, in f32
static void sparq_rows_f32(ggml_type type, const void * src, int64_t n_rows, int64_t n, float * dst) {
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, (size_t) n_rows*n*sizeof(float));
    } else {
        ggml_get_type_traits(type)->to_float(src, dst, n_rows*n);
    }
}

// why layer ikv cannot take SparQ, or nullptr
static const char * sparq_layer_unsupported(const llama_kv_cache & kv, size_t ikv) {
    const auto & hp = A::hparams(kv);
    const uint32_t il = A::il(kv, ikv);
    ggml_tensor * k = A::k(kv, ikv);
    ggml_tensor * v = A::v(kv, ikv);
    if (v == nullptr) {
        return "no V cache (MLA)";
    }
    if (!sparq_kv_type_ok(k->type) || !sparq_kv_type_ok(v->type)) {
        return "KV cache type (F16, F32 and Q8_0 supported)";
    }
    if (hp.attn_soft_cap || hp.f_max_alibi_bias != 0.0f) {
        return "attention soft-capping or ALiBi";
    }
    const uint32_t n_head = hp.n_head(il), n_head_kv = hp.n_head_kv(il);
    if (n_head_kv == 0 || n_head % n_head_kv != 0 || n_head/n_head_kv > 64) {
        return "head grouping";
    }
    if (hp.n_embd_head_k(il) > 256 || hp.n_embd_head_v(il) > 256 || hp.n_embd_head_k(il) != hp.n_embd_head_v(il)) {
        return "head size";
    }

    // the backend that holds the layer must have the op
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(k->buffer));
    if (dev == nullptr && ggml_backend_buffer_is_host(k->buffer)) {
        dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU); // host buffers run on the CPU backend
    }
    if (dev == nullptr) {
        return "no device for the layer's buffer";
    }
    ggml_init_params ip = { 16*ggml_tensor_overhead(), nullptr, true };
    ggml_context_ptr ctx(ggml_init(ip));
    const int64_t d = hp.n_embd_head_k(il), n = 256;
    ggml_tensor * q  = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F32, d, 1, n_head, 1);
    ggml_tensor * kk = ggml_new_tensor_4d(ctx.get(), k->type, d, n, n_head_kv, 1);
    ggml_tensor * kt = ggml_new_tensor_4d(ctx.get(), sparq_mirror_type(k->type), n, d, n_head_kv, 1);
    ggml_tensor * vv = ggml_new_tensor_4d(ctx.get(), v->type, d, n, n_head_kv, 1);
    ggml_tensor * vm = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F32, d, n_head_kv, 1, 1);
    ggml_tensor * m  = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F16, n, 1, 1, 1);
    ggml_tensor * op = ggml_sparq_attn(ctx.get(), q, kk, kt, vv, vm, m, 1.0f, 8, 32, 8, GGML_SPARQ_REALLOC);
    if (!ggml_backend_dev_supports_op(dev, op)) {
        return "the layer's backend has no SparQ kernel";
    }
    return nullptr;
}

static int32_t sparq_validate(const llama_sparq_params & p, const llama_kv_cache * kv) {
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
    if (p.realloc < -1 || p.realloc > 1) {
        return LLAMA_SPARQ_ERR_REALLOC;
    }
    if (p.min_ctx < -1) {
        return LLAMA_SPARQ_ERR_MIN_CTX;
    }
    if (p.layer_start < 0 || p.layer_end < -1 || (p.layer_end != -1 && p.layer_end <= p.layer_start)) {
        return LLAMA_SPARQ_ERR_LAYERS;
    }
    if (kv != nullptr) {
        const auto & hp = A::hparams(*kv);
        if ((uint32_t) p.layer_start >= hp.n_layer() || (p.layer_end != -1 && (uint32_t) p.layer_end > hp.n_layer())) {
            return LLAMA_SPARQ_ERR_LAYERS;
        }
        for (size_t ikv = 0; ikv < A::n_layers(*kv); ++ikv) {
            const int64_t d = hp.n_embd_head_k(A::il(*kv, ikv));
            if (p.r > d) {
                return LLAMA_SPARQ_ERR_R;
            }
            if (p.k == 0) {
                const int64_t r = sparq_resolve(p, d, 1).r;
                if (p.compression - r/(2.0*d) <= 0.0) {
                    return LLAMA_SPARQ_ERR_COMPRESSION;
                }
            }
        }
    }
    return LLAMA_SPARQ_OK;
}

struct llama_sparq_params llama_sparq_default_params(void) {
    llama_sparq_params p;
    p.k           = 0;
    p.compression = 0.125f;
    p.r           = 0;
    p.l           = -1;
    p.realloc     = -1;
    p.min_ctx     = -1;
    p.layer_start = 0;
    p.layer_end   = -1;
    p.no_tau      = false;
    return p;
}

const char * llama_sparq_strerror(int32_t status) {
    switch (status) {
        case LLAMA_SPARQ_OK:              return "ok";
        case LLAMA_SPARQ_DENSE:           return "no layer of this model or cache can use SparQ; decoding stays dense";
        case LLAMA_SPARQ_ERR_NULL:        return "context is NULL";
        case LLAMA_SPARQ_ERR_K:           return "k must be >= 1 (or 0 with a compression)";
        case LLAMA_SPARQ_ERR_COMPRESSION: return "compression must be in (0, 1] and leave room for r/(2*head size)";
        case LLAMA_SPARQ_ERR_BOTH:        return "give k or compression, not both";
        case LLAMA_SPARQ_ERR_R:           return "r must be in 1..head size (0: default)";
        case LLAMA_SPARQ_ERR_L:           return "l must be in 0..k (-1: default k/4)";
        case LLAMA_SPARQ_ERR_REALLOC:     return "realloc must be -1, 0 or 1";
        case LLAMA_SPARQ_ERR_MIN_CTX:     return "min_ctx must be >= 0 (-1: default)";
        case LLAMA_SPARQ_ERR_LAYERS:      return "layer range is empty or outside the model";
        case LLAMA_SPARQ_ERR_V_TRANS:     return "the context stores V transposed: create it with flash attention enabled";
        case LLAMA_SPARQ_ERR_ALLOC:       return "could not allocate the K^T mirror";
    }
    return "unknown status";
}

// allocate the mirror of every eligible layer; false on allocation failure
static bool sparq_alloc_mirror(llama_sparq_kv & st, const llama_kv_cache & kv, const std::vector<bool> & eligible) {
    st.free_mirror();
    const size_t n_layers = A::n_layers(kv);
    st.kt.assign(n_layers, nullptr);
    st.vsum_off.assign(n_layers, 0);

    std::map<ggml_backend_buffer_type_t, ggml_context_ptr> ctxs;
    for (size_t ikv = 0; ikv < n_layers; ++ikv) {
        if (!eligible[ikv]) {
            continue;
        }
        ggml_tensor * k = A::k(kv, ikv);
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(k->buffer);
        auto it = ctxs.find(buft);
        if (it == ctxs.end()) {
            ggml_init_params ip = { n_layers*ggml_tensor_overhead(), nullptr, true };
            it = ctxs.emplace(buft, ggml_context_ptr(ggml_init(ip))).first;
        }
        ggml_tensor * kt = ggml_new_tensor_3d(it->second.get(), sparq_mirror_type(k->type), k->ne[1], k->ne[0], k->ne[2]);
        ggml_format_name(kt, "sparq_kt_l%d", A::il(kv, ikv));
        st.kt[ikv] = kt;
        st.vsum_off[ikv] = st.vsum_size;
        st.vsum_size += A::v(kv, ikv)->ne[0];
        st.n_embd_kt = k->ne[0];
        st.n_eligible++;
    }
    for (auto & [buft, ctx] : ctxs) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft);
        if (buf == nullptr) {
            st.free_mirror();
            return false;
        }
        ggml_backend_buffer_clear(buf, 0);
        st.ctxs_bufs.emplace_back(std::move(ctx), ggml_backend_buffer_ptr(buf));
    }
    st.k_dirty = true;
    st.v_dirty = true;
    return true;
}

int32_t llama_sparq_set(struct llama_context * ctx, const struct llama_sparq_params * params) {
    if (ctx == nullptr) {
        return LLAMA_SPARQ_ERR_NULL;
    }
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
    if (kv == nullptr || A::shares_cells(*kv)) {
        LLAMA_LOG_WARN("%s: this model's memory is not a plain KV cache; SparQ is not used, decoding stays dense\n", __func__);
        return LLAMA_SPARQ_DENSE;
    }
    if (A::v_trans(*kv)) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_sparq_strerror(LLAMA_SPARQ_ERR_V_TRANS));
        return LLAMA_SPARQ_ERR_V_TRANS;
    }

    // which layers can take SparQ
    const auto & hp = A::hparams(*kv);
    const int32_t layer_end = params->layer_end == -1 ? (int32_t) hp.n_layer() : params->layer_end;
    const size_t n_layers = A::n_layers(*kv);
    std::vector<bool> eligible(n_layers, false);
    const char * why_not = nullptr;
    int64_t n_embd_kt = -1;
    for (size_t ikv = 0; ikv < n_layers; ++ikv) {
        const int32_t il = (int32_t) A::il(*kv, ikv);
        if (il < params->layer_start || il >= layer_end) {
            continue;
        }
        const char * why = sparq_layer_unsupported(*kv, ikv);
        if (why == nullptr && n_embd_kt != -1 && A::k(*kv, ikv)->ne[0] != n_embd_kt) {
            why = "K width differs from the first SparQ layer";
        }
        if (why != nullptr) {
            why_not = why;
            continue;
        }
        n_embd_kt = A::k(*kv, ikv)->ne[0];
        eligible[ikv] = true;
    }
    if (std::none_of(eligible.begin(), eligible.end(), [](bool b) { return b; })) {
        LLAMA_LOG_WARN("%s: no layer can use SparQ (%s); decoding stays dense\n", __func__,
                why_not ? why_not : "none in the layer range");
        if (kv->sparq && kv->sparq->enabled) {
            llama_sparq_set(ctx, nullptr);
        }
        return LLAMA_SPARQ_DENSE;
    }

    if (!kv->sparq) {
        kv->sparq = std::make_shared<llama_sparq_kv>();
    }
    auto & st = *kv->sparq;

    bool same_layers = st.enabled && st.kt.size() == n_layers;
    for (size_t ikv = 0; same_layers && ikv < n_layers; ++ikv) {
        same_layers = (st.kt[ikv] != nullptr) == eligible[ikv];
    }
    if (!same_layers && !sparq_alloc_mirror(st, *kv, eligible)) {
        st.enabled = false;
        LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_sparq_strerror(LLAMA_SPARQ_ERR_ALLOC));
        return LLAMA_SPARQ_ERR_ALLOC;
    }

    const bool realloc = params->realloc == -1 ? hp.n_head(A::il(*kv, 0)) == hp.n_head_kv(A::il(*kv, 0)) : params->realloc == 1;
    if (realloc && !st.realloc) {
        st.v_dirty = true; // the sums were not kept up to date while reallocation was off
    }
    // A quantized cache makes upstream rotate Q and K by a Hadamard matrix, which spreads q's mass
    // evenly over the components; step 1 keeps the r largest |q_i| and relies on that mass being
    // uneven. Measured (scripts/eval_kv_rotation.py, SmolLM2, q8_0, 1/8): KL to dense 0.074 with
    // the rotation, 0.023 without; dense q8_0 itself is no worse without it. The rotation is the
    // cache's (K is stored rotated), so it can only be dropped while the cache holds nothing.
    if (A::attn_rot_k(*kv)) {
        bool empty = true;
        for (uint32_t s = 0; s < kv->get_n_stream(); ++s) {
            empty = empty && A::cells(*kv, s).get_used() == 0;
        }
        if (empty) {
            A::attn_rot_k(*kv) = false;
            LLAMA_LOG_INFO("%s: Hadamard rotation of Q and K turned off for this cache (it spreads q over "
                    "all components, which SparQ's component choice relies on not happening)\n", __func__);
        } else {
            LLAMA_LOG_WARN("%s: the cache already holds Hadamard-rotated keys, so SparQ picks components "
                    "in the rotated basis (less accurate); set SparQ before the first decode, or set "
                    "LLAMA_ATTN_ROT_DISABLE=1, to keep the rotation off\n", __func__);
        }
    }

    st.params   = *params;
    st.realloc  = realloc;
    st.min_ctx  = params->min_ctx == -1 ? SPARQ_DEFAULT_MIN_CTX : params->min_ctx;
    st.enabled  = true;
    st.generation++;
    ctx->sparq_need_reserve();

    LLAMA_LOG_INFO("%s: SparQ on %d of %d attention layers (%s %g, r %d, l %d, reallocation %s, from n_kv %d)%s%s\n",
            __func__, st.n_eligible, n_layers_all, params->k > 0 ? "k" : "compression",
            params->k > 0 ? (double) params->k : (double) params->compression, params->r, params->l,
            realloc ? "on" : "off", st.min_ctx, why_not ? "; others dense: " : "", why_not ? why_not : "");
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
        int64_t extra = 0;
        for (const auto & [_, buf] : st.ctxs_bufs) {
            extra += ggml_backend_buffer_get_size(buf.get());
        }
        for (const auto & s : st.vsum) {
            extra += s.size()*sizeof(double);
        }
        for (const auto & f : st.in_sum) {
            extra += f.size();
        }
        stats->extra_bytes = extra;
    }
    stats->n_layers = n_layers;
    return LLAMA_SPARQ_OK;
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

// row `offs` (bytes) of a V cache tensor, as fp32 in `row`
static void sparq_v_row_f32(const ggml_tensor * v, size_t offs, std::vector<uint8_t> & raw, std::vector<float> & row) {
    const int64_t n = v->ne[0];
    const void * src;
    if (ggml_backend_buffer_is_host(v->buffer)) {
        src = (const char *) v->data + offs;
    } else {
        raw.resize(v->nb[1]);
        ggml_backend_tensor_get(v, raw.data(), offs, v->nb[1]);
        src = raw.data();
    }
    row.resize(n);
    sparq_rows_f32(v->type, src, 1, n, row.data());
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
    const auto & st = *kv->sparq;
    const uint32_t kv_size = kv->get_size();
    int64_t n_bad = 0;
    std::vector<uint8_t> kbuf, tbuf, vbuf;
    std::vector<float> row, kf, tf;
    for (size_t ikv = 0; ikv < st.kt.size(); ++ikv) {
        ggml_tensor * kt = st.kt[ikv];
        if (kt == nullptr) {
            continue;
        }
        ggml_tensor * k = A::k(*kv, ikv);
        const int64_t n_embd = k->ne[0];
        kbuf.resize(ggml_nbytes(k));
        tbuf.resize(ggml_nbytes(kt));
        ggml_backend_tensor_get(k, kbuf.data(), 0, kbuf.size());
        ggml_backend_tensor_get(kt, tbuf.data(), 0, tbuf.size());
        if (k->type == kt->type) {
            // the mirror holds K's own values: bit for bit
            const size_t ts = ggml_type_size(k->type);
            for (uint32_t s = 0; s < kv->get_n_stream(); ++s) {
                const auto & cells = A::cells(*kv, s);
                for (uint32_t c = 0; c < cells.used_max_p1(); ++c) {
                    if (cells.is_empty(c)) {
                        continue;
                    }
                    for (int64_t j = 0; j < n_embd; ++j) {
                        const uint8_t * a = kbuf.data() + ((size_t) s*kv_size + c)*k->nb[1] + j*ts;
                        const uint8_t * b = tbuf.data() + (((size_t) s*n_embd + j)*kv_size + c)*ts;
                        n_bad += memcmp(a, b, ts) != 0;
                    }
                }
            }
            continue;
        }
        // quantized K, F16 mirror written from the same unquantized K: they agree to within half a
        // quantization step of K's block (its largest |value| / 127 for Q8_0) plus f16 rounding
        kf.resize((size_t) n_embd);
        tf.resize(ggml_nelements(kt));
        sparq_rows_f32(kt->type, tbuf.data(), ggml_nrows(kt), kt->ne[0], tf.data());
        const int64_t blk = ggml_blck_size(k->type);
        for (uint32_t s = 0; s < kv->get_n_stream(); ++s) {
            const auto & cells = A::cells(*kv, s);
            for (uint32_t c = 0; c < cells.used_max_p1(); ++c) {
                if (cells.is_empty(c)) {
                    continue;
                }
                sparq_rows_f32(k->type, kbuf.data() + ((size_t) s*kv_size + c)*k->nb[1], 1, n_embd, kf.data());
                for (int64_t j0 = 0; j0 < n_embd; j0 += blk) {
                    float amax = 0.0f;
                    for (int64_t j = j0; j < j0 + blk; ++j) amax = std::max(amax, std::fabs(kf[j]));
                    for (int64_t j = j0; j < j0 + blk; ++j) {
                        const float m = tf[((size_t) s*n_embd + j)*kv_size + c];
                        const float tol = 0.5f*amax/127.0f*1.01f + std::fabs(kf[j])/1024.0f + 1e-6f;
                        n_bad += !(std::fabs(m - kf[j]) <= tol);
                    }
                }
            }
        }
    }
    float max_err = 0.0f;
    for (size_t q = 0; q < st.in_sum.size(); ++q) {
        if (st.in_sum[q].empty()) {
            continue;
        }
        const uint32_t strm = kv->get_stream(q);
        std::vector<double> fresh(st.vsum_size, 0.0);
        for (uint32_t c = 0; c < kv_size; ++c) {
            if (!st.in_sum[q][c]) {
                continue;
            }
            for (size_t ikv = 0; ikv < st.kt.size(); ++ikv) {
                if (st.kt[ikv] == nullptr) {
                    continue;
                }
                ggml_tensor * v = A::v(*kv, ikv);
                sparq_v_row_f32(v, ((size_t) strm*kv_size + c)*v->nb[1], vbuf, row);
                for (int64_t j = 0; j < v->ne[0]; ++j) {
                    fresh[st.vsum_off[ikv] + j] += row[j];
                }
            }
        }
        for (size_t j = 0; j < st.vsum_size; ++j) {
            const double fed = (float) st.vsum[q][j];  // what the op gets
            max_err = std::max(max_err, (float) (std::fabs(fed - fresh[j])/(1.0 + std::fabs(fresh[j]))));
        }
    }
    if (max_rel_err_v != nullptr) {
        *max_rel_err_v = max_err;
    }
    return n_bad;
}

//
// graph input
//

class llm_graph_input_sparq : public llm_graph_input_i {
public:
    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;

    const llama_kv_cache_context * mctx = nullptr;
    std::shared_ptr<llama_sparq_kv> st;  // keeps the mirror alive as long as the graph
    uint32_t generation = 0;
    uint32_t n_kv       = 0;
    bool     use_op     = false;         // this ubatch takes SparQ

    ggml_tensor * kt_idxs = nullptr;     // I64 [n_tokens*n_embd_kt]: mirror element of each K element
    ggml_tensor * vsum    = nullptr;     // F32 [vsum_size, n_tokens]: V sum of the token's sequence, before it
    ggml_tensor * inv_cnt = nullptr;     // F32 [1, n_tokens]: 1/(cells in that sum + 1)

    struct layer_info { int64_t n_head_kv, d, r, k, type_size; };
    std::vector<layer_info> layers;      // SparQ layers of this graph, for the read estimate

private:
    void rebuild_mirror(const llama_kv_cache & kv);
    void add_row(const llama_kv_cache & kv, uint32_t strm, uint32_t cell, llama_seq_id s, float sign);
};

static bool sparq_decide(const llama_sparq_kv & st, const llama_ubatch & ub, const llama_cparams & cp, uint32_t n_kv) {
    if (!st.enabled || st.n_eligible == 0 || cp.training || !cp.causal_attn) {
        return false;
    }
    // a decode ubatch: one token for each of its sequences (n_seq_tokens == 1 alone is also
    // true of a prefill split by split_simple)
    if (ub.n_tokens == 0 || ub.n_tokens != ub.n_seqs_unq) {
        return false;
    }
    if (ub.n_seq_id != nullptr) {
        for (uint32_t i = 0; i < ub.n_tokens; ++i) {
            if (ub.n_seq_id[i] > 1) {
                return false;
            }
        }
    }
    if ((int64_t) n_kv < st.min_ctx) {
        return false;
    }
    return !(st.params.k > 0 && st.params.k >= (int64_t) n_kv); // every position would be read
}

llm_graph_input_sparq * llama_sparq_build_input(
        ggml_context * ctx0,
    llm_graph_result * res,
  const llama_ubatch & ubatch,
 const llama_cparams & cparams,
 const llama_kv_cache_context * mctx) {
    if (mctx == nullptr || cparams.training) {
        return nullptr;
    }
    llama_kv_cache * kv = A::kv(mctx);
    if (kv == nullptr || !kv->sparq || !kv->sparq->enabled || kv->sparq->n_eligible == 0) {
        return nullptr;
    }
    auto inp = std::make_unique<llm_graph_input_sparq>();
    inp->mctx       = mctx;
    inp->st         = kv->sparq;
    inp->generation = kv->sparq->generation;
    inp->n_kv       = mctx->get_n_kv();
    inp->use_op     = sparq_decide(*kv->sparq, ubatch, cparams, inp->n_kv);

    inp->kt_idxs = ggml_new_tensor_1d(ctx0, GGML_TYPE_I64, (int64_t) ubatch.n_tokens*kv->sparq->n_embd_kt);
    ggml_set_input(inp->kt_idxs);
    ggml_set_name(inp->kt_idxs, "sparq_inp_kt_idxs");

    if (inp->use_op && kv->sparq->realloc) {
        inp->vsum = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, kv->sparq->vsum_size, ubatch.n_tokens);
        ggml_set_input(inp->vsum);
        ggml_set_name(inp->vsum, "sparq_inp_vsum");
        inp->inv_cnt = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, 1, ubatch.n_tokens);
        ggml_set_input(inp->inv_cnt);
        ggml_set_name(inp->inv_cnt, "sparq_inp_inv_cnt");
    }
    return (llm_graph_input_sparq *) res->add_input(std::move(inp));
}

bool llm_graph_input_sparq::can_reuse(const llm_graph_params & params) {
    const llama_kv_cache_context * m = nullptr;
    if (auto * iswa = dynamic_cast<const llama_kv_cache_iswa_context *>(params.mctx)) {
        m = iswa->get_base();
    } else {
        m = dynamic_cast<const llama_kv_cache_context *>(params.mctx);
    }
    if (m == nullptr || A::kv(m) == nullptr || A::kv(m)->sparq != st || st->generation != generation) {
        return false;
    }
    if (m->get_n_kv() != n_kv || kt_idxs->ne[0] != (int64_t) params.ubatch.n_tokens*st->n_embd_kt) {
        return false;
    }
    if (sparq_decide(*st, params.ubatch, params.cparams, n_kv) != use_op) {
        return false;
    }
    mctx = m;
    return true;
}

// the V row of a cell, added to (sign +1) or taken from (-1) sequence s's sums, all SparQ layers
void llm_graph_input_sparq::add_row(const llama_kv_cache & kv, uint32_t strm, uint32_t cell, llama_seq_id s, float sign) {
    const uint32_t kv_size = kv.get_size();
    std::vector<float> row;
    std::vector<uint8_t> raw;
    double * sum = st->vsum[s].data();
    for (size_t ikv = 0; ikv < st->kt.size(); ++ikv) {
        if (st->kt[ikv] == nullptr) {
            continue;
        }
        ggml_tensor * v = A::v(kv, ikv);
        sparq_v_row_f32(v, ((size_t) strm*kv_size + cell)*v->nb[1], raw, row);
        double * dst = sum + st->vsum_off[ikv];
        for (int64_t j = 0; j < v->ne[0]; ++j) {
            dst[j] += sign*row[j];
        }
    }
    st->count[s] += sign > 0 ? 1 : -1;
}

void llm_graph_input_sparq::rebuild_mirror(const llama_kv_cache & kv) {
    const uint32_t kv_size = kv.get_size();
    std::vector<uint8_t> kbuf, tbuf;
    std::vector<float> kf;
    for (size_t ikv = 0; ikv < st->kt.size(); ++ikv) {
        ggml_tensor * kt = st->kt[ikv];
        if (kt == nullptr) {
            continue;
        }
        ggml_tensor * k = A::k(kv, ikv);
        const size_t ts = ggml_type_size(kt->type);
        const int64_t n_embd = k->ne[0];
        for (uint32_t s = 0; s < kv.get_n_stream(); ++s) {
            const uint32_t n = A::cells(kv, s).used_max_p1();
            if (n == 0) {
                continue;
            }
            kbuf.resize((size_t) n*k->nb[1]);
            ggml_backend_tensor_get(k, kbuf.data(), (size_t) s*kv_size*k->nb[1], kbuf.size());
            if (k->type != kt->type) {  // quantized K: its values in f32, then the mirror's type (F16)
                kf.resize((size_t) n*n_embd);
                sparq_rows_f32(k->type, kbuf.data(), n, n_embd, kf.data());
                kbuf.resize(kf.size()*ts);
                ggml_fp32_to_fp16_row(kf.data(), (ggml_fp16_t *) kbuf.data(), (int64_t) kf.size());
            }
            const size_t row = (size_t) n_embd*ts;  // bytes of one cell's K in kbuf
            tbuf.resize((size_t) n*ts);
            for (int64_t j = 0; j < n_embd; ++j) {
                for (uint32_t c = 0; c < n; ++c) {
                    memcpy(tbuf.data() + c*ts, kbuf.data() + c*row + j*ts, ts);
                }
                ggml_backend_tensor_set(kt, tbuf.data(), ((size_t) s*n_embd + j)*kv_size*ts, tbuf.size());
            }
        }
    }
}

void llm_graph_input_sparq::set_input(const llama_ubatch * ubatch) {
    llama_kv_cache & kv = *A::kv(mctx);
    const auto & sinfo = A::sinfo(mctx);
    const uint32_t kv_size = kv.get_size();
    const int64_t n_embd = st->n_embd_kt;

    // 1. where each K element of the ubatch goes in the mirror
    {
        GGML_ASSERT(ggml_backend_buffer_is_host(kt_idxs->buffer));
        int64_t * idx = (int64_t *) kt_idxs->data;
        const size_t size = sinfo.size();
        for (uint32_t s = 0; s < sinfo.n_stream(); ++s) {
            const int64_t offs = (int64_t) sinfo.strm[s]*kv_size*n_embd;
            for (size_t i = 0; i < size; ++i) {
                const int64_t cell = sinfo.idxs[s][i];
                int64_t * row = idx + (s*size + i)*n_embd;
                for (int64_t j = 0; j < n_embd; ++j) {
                    row[j] = offs + j*kv_size + cell;
                }
            }
        }
    }

    // 2. K changed outside the graphs: rebuild the mirror (the cells of this ubatch are written by the graph)
    if (st->k_dirty) {
        rebuild_mirror(kv);
        st->k_dirty = false;
    }

    // 3. running V sums
    std::vector<int64_t> n_vis(ubatch->n_tokens, 0);
    if (st->realloc) {
        if (st->v_dirty) {
            st->reset_sums();
            st->v_dirty = false;
        }
        const size_t n_seq = kv.get_n_seq_max(); // batches are validated against it
        if (st->vsum.size() != n_seq) {
            st->in_sum.assign(n_seq, {});
            st->vsum.assign(n_seq, {});
            st->count.assign(n_seq, 0);
            st->hi.assign(n_seq, 0);
        }

        // the cells this ubatch writes, per stream; any sum holding them lets go first
        std::vector<std::vector<uint8_t>> written(kv.get_n_stream());
        for (uint32_t s = 0; s < sinfo.n_stream(); ++s) {
            const uint32_t strm = sinfo.strm[s];
            written[strm].assign(kv_size, 0);
            for (uint32_t cell : sinfo.idxs[s]) {
                written[strm][cell] = 1;
                for (size_t q = 0; q < n_seq; ++q) {
                    if (!st->in_sum[q].empty() && kv.get_stream(q) == strm && st->in_sum[q][cell]) {
                        add_row(kv, strm, cell, q, -1.0f);
                        st->in_sum[q][cell] = 0;
                    }
                }
            }
        }

        if (use_op) {
            GGML_ASSERT(ggml_backend_buffer_is_host(vsum->buffer) && ggml_backend_buffer_is_host(inv_cnt->buffer));
            float * vs = (float *) vsum->data;
            float * ic = (float *) inv_cnt->data;
            for (uint32_t i = 0; i < ubatch->n_tokens; ++i) {
                const llama_seq_id q = ubatch->seq_id[i][0];
                const llama_pos    p = ubatch->pos[i];
                const uint32_t strm = kv.get_stream(q);
                const auto & cells = A::cells(kv, strm);
                if (st->in_sum[q].empty()) {
                    st->in_sum[q].assign(kv_size, 0);
                    st->vsum[q].assign(st->vsum_size, 0.0);
                }
                auto & flags = st->in_sum[q];
                const auto & wr = written[strm];
                const uint32_t hi = std::max(st->hi[q], cells.used_max_p1());
                for (uint32_t c = 0; c < hi; ++c) {
                    const bool want = !(wr.size() && wr[c]) && !cells.is_empty(c) && cells.seq_has(c, q) && cells.pos_get(c) <= p;
                    if (want != (bool) flags[c]) {
                        add_row(kv, strm, c, q, want ? 1.0f : -1.0f);
                        flags[c] = want;
                    }
                }
                st->hi[q] = hi;
                std::copy(st->vsum[q].begin(), st->vsum[q].end(), vs + (size_t) i*st->vsum_size);  // fp64 -> fp32
                ic[i] = 1.0f/(float) (st->count[q] + 1);
                n_vis[i] = st->count[q] + 1;
            }
        }
    }

    // 4. counters
    if (use_op) {
        st->stats.n_tokens_sparq += ubatch->n_tokens;
        for (uint32_t i = 0; i < ubatch->n_tokens; ++i) {
            const int64_t S = n_vis[i] > 0 ? n_vis[i] : std::min<int64_t>((int64_t) ubatch->pos[i] + 1, n_kv);
            for (const auto & li : layers) {
                const int64_t kk = std::min<int64_t>(li.k, S);
                st->stats.bytes_attn_sparq += (double) li.n_head_kv*li.type_size*(S*li.r + 2*kk*li.d);
                st->stats.bytes_attn_dense += (double) li.n_head_kv*li.type_size*(2*S*li.d);
            }
        }
    } else {
        st->stats.n_tokens_dense += ubatch->n_tokens;
    }
}

//
// graph
//

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
                 int   il) {
    if (inp == nullptr) {
        return nullptr;
    }
    auto & st = *inp->st;
    const llama_kv_cache & kv = *A::kv(inp->mctx);
    const int32_t ikv = A::ikv(kv, il);
    if (ikv < 0 || (size_t) ikv >= st.kt.size() || st.kt[ikv] == nullptr) {
        return nullptr;
    }
    ggml_tensor * kt = st.kt[ikv];

    // the mirror: every element of k_cur is a row of the flattened K^T
    {
        ggml_tensor * kc = ggml_is_contiguous(k_cur) ? k_cur : ggml_cont(ctx0, k_cur);
        kc = ggml_reshape_2d(ctx0, kc, 1, ggml_nelements(kc));
        ggml_tensor * dst = ggml_reshape_2d(ctx0, kt, 1, ggml_nelements(kt));
        ggml_build_forward_expand(gf, ggml_set_rows(ctx0, dst, kc, inp->kt_idxs));
    }

    if (!inp->use_op || kq_b != nullptr || sinks != nullptr) {
        return nullptr;
    }

    const int64_t d         = q->ne[0];
    const int64_t n_tokens  = q->ne[2];
    const int64_t n_head_kv = k->ne[1];
    const int64_t n_kv      = k->ne[2];
    const int64_t ns        = k->ne[3];
    const int64_t kv_size   = kv.get_size();
    const int64_t n_embd    = kt->ne[1];
    const size_t  ts        = ggml_type_size(kt->type);

    // as build_attn_mha: split the tokens into streams, then [D, n_tokens, n_head, ns]
    ggml_tensor * q4 = ggml_view_4d(ctx0, q, d, q->ne[1], n_tokens/ns, ns, q->nb[1], q->nb[2], q->nb[2]*(n_tokens/ns), 0);
    q4 = ggml_permute(ctx0, q4, 0, 2, 1, 3);
    ggml_tensor * k4 = ggml_permute(ctx0, k, 0, 2, 1, 3);
    ggml_tensor * v4 = ggml_permute(ctx0, v, 0, 2, 1, 3);
    ggml_tensor * kt4 = ggml_view_4d(ctx0, kt, n_kv, d, n_head_kv, ns,
            kv_size*ts, d*kv_size*ts, n_embd*kv_size*ts, n_embd*kv_size*ts*A::sinfo(inp->mctx).s0);

    int32_t flags = st.params.no_tau ? GGML_SPARQ_NO_TAU : 0;
    ggml_tensor * vmean = nullptr;
    if (st.realloc) {
        flags |= GGML_SPARQ_REALLOC;
        // mean over the visible positions = (sum over the cells before + this token's V) / (count + 1)
        const int64_t n_embd_v = v_cur->ne[0]*v_cur->ne[1];
        ggml_tensor * vc = v_cur->type == GGML_TYPE_F32 ? v_cur : ggml_cast(ctx0, v_cur, GGML_TYPE_F32);
        vc = ggml_is_contiguous(vc) ? ggml_reshape_2d(ctx0, vc, n_embd_v, n_tokens) : ggml_cont_2d(ctx0, vc, n_embd_v, n_tokens);
        ggml_tensor * vs = ggml_view_2d(ctx0, inp->vsum, n_embd_v, n_tokens, inp->vsum->nb[1], st.vsum_off[ikv]*sizeof(float));
        vmean = ggml_mul(ctx0, ggml_add(ctx0, vc, vs), inp->inv_cnt);
        vmean = ggml_reshape_4d(ctx0, vmean, v_cur->ne[0], n_head_kv, n_tokens/ns, ns);
    }

    const sparq_layer_cfg cfg = sparq_resolve(st.params, d, inp->n_kv);
    inp->layers.push_back({ n_head_kv, d, cfg.r, cfg.k, (int64_t) ts });

    ggml_tensor * cur = ggml_sparq_attn(ctx0, q4, k4, kt4, v4, vmean, kq_mask, kq_scale, cfg.r, cfg.k, cfg.l, flags);
    return ggml_reshape_2d(ctx0, cur, cur->ne[0]*cur->ne[1], cur->ne[2]*cur->ne[3]);
}
