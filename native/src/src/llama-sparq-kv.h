// sparq-cpp: the SparQ state of one KV cache (llama-sparq-kv.cpp): the K^T mirror of every SparQ
// layer and the running V sums per sequence, with the methods that keep them consistent with
// the cache. Shared by the C API (llama-sparq.cpp) and the graph (llama-sparq-graph.cpp).
//
// How they stay consistent (docs/sparq.md, "The cache"):
// - The K^T mirror (positions contiguous per component) of every SparQ layer is written by the
//   same graph that writes K (one ggml_set_rows per layer), in every ubatch while SparQ is set.
//   Anything else that changes K (K-shift, stream copy, state load) marks it stale
//   (llama_sparq_kv_invalidate), and it is rebuilt from K before the next graph.
// - The running V sum of a sequence is the sum of V over a tracked set of cells, kept in fp64 on
//   the host and handed to the op in fp32. Before a SparQ ubatch the set is brought to "cells of
//   the sequence at positions <= the new token's", adding and subtracting rows; a cell's row is
//   subtracted before any ubatch overwrites it, so what is subtracted is always what was added.
//   Sequence operations need no hook (they only change cell metadata); freed cells leave the
//   sum at the next sync. The new token's own V is added inside the graph.
#pragma once

#include "llama-sparq.h"

#include "llama-kv-cache.h"

#include "ggml-cpp.h"

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

// The private members of upstream's cache that SparQ reads (friend in llama-kv-cache.h).
struct llama_sparq_access {
    static const llama_hparams & hparams(const llama_kv_cache & kv) { return kv.hparams; }
    static const llama_model & model(const llama_kv_cache & kv) { return kv.model; }
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

using cache_internals = llama_sparq_access;

// r, k and l of one layer for n visible positions (llama-sparq.cpp). The fused op then lets each
// query select its own share of its own visible positions (ggml_sparq_attn_set_budget): k_frac
// of them with a compression (k is then the most a query of n positions selects), a window of
// k/l_div (l_div > 0: the default k/4) or of l; a query with fewer than min_vis visible positions
// attends to all of them (min_ctx, and for a fixed k the length below which SparQ would read no
// less than dense)
struct llama_sparq_layer_cfg {
    int32_t r;
    int32_t k;
    int32_t l;
    float   k_frac;
    int32_t l_div;
    int32_t min_vis;
};

// What one position costs to read, per KV head, for sparq_stats() and the planning of an INT8
// mirror: one K^T mirror element, the mirror's bytes per position besides (an INT8 mirror's
// exponent), and the position's K row and V row together (quantization scales included). Dense
// attention reads kv_row for every position; SparQ r*mirror_elem + mirror_pos for every
// position and kv_row for k of them.
struct llama_sparq_bytes {
    double mirror_elem;
    double mirror_pos;
    double kv_row;
    bool   mirror_i8;
};

// What one query that sees S positions reads in a SparQ layer, per KV head: the fused op with its
// own budget (the op's query_budget: every row below min_vis, else k_frac of S up to c.k), the
// portable graph c.k rows for every query; a fused query that selects every row reads as dense
// does. The decode's counters (llama-sparq-graph.cpp) and llama_sparq_plan both count this.
struct llama_sparq_query_read {
    int64_t k;
    int32_t l;
    double  bytes;
};

llama_sparq_query_read llama_sparq_read(const llama_sparq_layer_cfg & c, const llama_sparq_bytes & b, int64_t S,
                                        bool fused, double vmean_bytes);

llama_sparq_bytes llama_sparq_layer_bytes(ggml_type type_kt, ggml_type type_k, ggml_type type_v, int64_t d, int64_t dv);

// bytes: the layer's (planning by bytes with an INT8 mirror); null: by elements
llama_sparq_layer_cfg llama_sparq_resolve(const llama_sparq_params & p, int64_t d, int64_t n_kv,
                                          const llama_sparq_bytes * bytes = nullptr);

// The K^T mirror's type: I8 (with its exponent row, ggml_sparq_quantize_kt) where i8; else F32
// for an F32 cache, F16 otherwise (a quantized K's mirror cannot be written one element at a
// time, and step 2 only needs approximate scores).
ggml_type llama_sparq_mirror_type(ggml_type type_k, bool i8);

struct llama_sparq_kv {
    bool enabled = false;
    llama_sparq_params params = {};  // as given by the user
    bool     realloc = false;        // mean reallocation, resolved
    int32_t  min_ctx = 0;            // resolved
    uint32_t generation = 0;         // bumped on every change: graphs built before are not reused

    // per cache layer (index of llama_kv_cache::layers)
    std::vector<ggml_tensor *> kt;   // K^T mirror [kv_size, n_embd_k_gqa, n_stream], null: layer stays dense;
                                     // I8: [kv_size, n_head_kv*(head size + 1), n_stream], per head its
                                     // components then their exponents (ggml_sparq_attn's I8 K^T)
    std::vector<size_t> vsum_off;    // offset of the layer's V sum in a sequence's sum vector
    std::vector<bool> ops;           // the layer runs the portable graph (else the fused op)
    std::vector<int32_t> ops_flags;  // its portable graph's ggml_sparq_flags for the backend (GATHER, MUL_MAT)
    int32_t n_eligible = 0;
    int32_t n_ops      = 0;          // layers with ops[ikv]
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

    // logs what SparQ did (tokens, bytes read against dense) when the cache goes, so that tools
    // that print nothing of their own (llama-cli, llama-server) report it
    ~llama_sparq_kv();

    // f(ikv, kt) for every layer that takes SparQ (its mirror kt is not null)
    template <typename F> void for_each_layer(F && f) const {
        for (size_t ikv = 0; ikv < kt.size(); ++ikv) {
            if (kt[ikv] != nullptr) {
                f(ikv, kt[ikv]);
            }
        }
    }

    // a zeroed mirror of type types[ikv] for the layers that have one (GGML_TYPE_COUNT: none),
    // in the buffer type of each layer's K; false (and nothing allocated) when a buffer cannot be had
    bool allocate(const llama_kv_cache & kv, const std::vector<ggml_type> & types);
    void free_mirror();
    void reset_sums();

    // the mirror of every SparQ layer, from K over the used cells of every stream
    void rebuild_mirror(const llama_kv_cache & kv);

    // Brings the V sums to what a ubatch needs: cells the ubatch writes leave every sum; with
    // vsum_out (use_op), each token's sequence sum becomes "its cells at positions <= the
    // token's" and is written to vsum_out [vsum_size per token] in fp32, with 1/(count + 1) in
    // inv_cnt_out and count + 1 in n_vis.
    void sync_sums(const llama_kv_cache & kv, const llama_kv_cache::slot_info & sinfo, const llama_ubatch & ub,
                   float * vsum_out, float * inv_cnt_out, std::vector<int64_t> & n_vis);

    // llama_sparq_check: mirror elements that differ from K (INT8: from K quantized), largest
    // relative V-sum error
    int64_t check(const llama_kv_cache & kv, float * max_rel_err_v) const;

    // memory SparQ adds: the mirror's buffers and the host-side sums
    int64_t extra_bytes() const;

private:
    // the V row of a cell, added to (sign +1) or taken from (-1) sequence s's sums, all SparQ layers
    void add_row(const llama_kv_cache & kv, uint32_t strm, uint32_t cell, llama_seq_id s, float sign);
};
