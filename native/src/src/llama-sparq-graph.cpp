// sparq-cpp: SparQ in libllama's decode graph. One graph input per ubatch
// (llm_graph_input_sparq: where the new K goes in the mirror, the V sums, the counters) and, per
// attention layer, the mirror write and the SparQ branch (llama_sparq_build_attn), which the
// hooks in upstream's build_attn call (native/patches/0004). The branch is GGML_OP_SPARQ_ATTN
// (the fused op) where the layer's backend has it, or the same computation built from standard
// ggml ops (ggml_sparq_attn_ops), which every backend runs; llama-sparq.cpp decides per layer.
#include "llama-sparq-impl.h"
#include "llama-sparq-kv.h"

#include "llama-graph.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-memory-hybrid.h"
#include "llama-memory-hybrid-iswa.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <utility>
#include <vector>

// cells not visible to a token get this rank in vis_rank (never inside a window)
static constexpr float SPARQ_RANK_HIDDEN = 1e9f;

class llm_graph_input_sparq : public llm_graph_input_i {
public:
    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;

    const llama_kv_cache_context * mctx = nullptr;
    std::shared_ptr<llama_sparq_kv> st;  // keeps the mirror alive as long as the graph
    uint32_t generation = 0;
    uint32_t n_kv       = 0;
    int64_t  n_plan     = 0;             // the portable graph's: the longest visible sequence of the ubatch
    int64_t  n_plan_min = 0;             // and the shortest
    bool     use_op     = false;         // this ubatch takes SparQ

    // I64 [n_tokens*n_embd_k]: the mirror element of each K element of the ubatch, one tensor per
    // K width (layers may differ: OpenELM's KV heads per layer), made by the first layer of that width
    std::map<int64_t, ggml_tensor *> kt_idxs;
    int64_t n_tokens = 0;
    ggml_tensor * vsum    = nullptr;     // F32 [vsum_size, n_tokens]: V sum of the token's sequence, before it
    ggml_tensor * inv_cnt = nullptr;     // F32 [1, n_tokens]: 1/(cells in that sum + 1)

    // portable graph (layers without the fused op): per token and cell, the cell's rank among the
    // token's visible cells counted from the last one (0), SPARQ_RANK_HIDDEN when not visible
    ggml_tensor * vis_rank = nullptr;    // F32 [n_kv, n_tokens]
    std::map<int32_t, ggml_tensor *> bias;  // per window l: mask + window bonus, for every stream
    ggml_tensor * mask_f16 = nullptr;    // the KQ mask as F16, where it is F32 (flash attention off)

    struct layer_info { int64_t n_head_kv, d; llama_sparq_layer_cfg cfg; llama_sparq_bytes bytes; double vmean_bytes; bool fused; };
    std::vector<layer_info> layers;      // SparQ layers of this graph, for the read estimate
};

// whether a ubatch takes SparQ: a decode ubatch (one token for each of its sequences) over a
// cache long enough for SparQ to read less than dense
static bool use_sparq(const llama_sparq_kv & st, const llama_ubatch & ub, const llama_cparams & cp, uint32_t n_kv) {
    if (!st.enabled || st.n_eligible == 0 || cp.training || !cp.causal_attn) {
        return false;
    }
    // n_seq_tokens == 1 alone is also true of a prefill split by split_simple
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

// The most and the fewest positions a token of the ubatch sees (its sequence's cells up to its
// position): the portable graph plans its one k on the most, so that a sequence alone reads what
// the fused op reads, and masks after its selection only where a token sees fewer than k.
static std::pair<int64_t, int64_t> visible_range(const llama_kv_cache & kv, const llama_ubatch & ub, uint32_t n_kv) {
    int64_t lo = INT64_MAX, hi = 1;
    for (uint32_t i = 0; i < ub.n_tokens; ++i) {
        const llama_seq_id q = ub.seq_id[i][0];
        const llama_pos    p = ub.pos[i];
        const auto & cells = cache_internals::cells(kv, kv.get_stream(q));
        int64_t n = 0;
        for (uint32_t c = 0; c < n_kv; ++c) {
            n += !cells.is_empty(c) && cells.seq_has(c, q) && cells.pos_get(c) <= p;
        }
        lo = std::min(lo, n);
        hi = std::max(hi, n);
    }
    return { std::min(lo, hi), hi };
}

// The ubatch's K into an I8 mirror (a: [kv_size, n_head*(d + 1), n_stream]), quantized per cell
// and head from the layer's K as cached (b: [n_embd, kv_size, n_stream], written earlier in the
// graph), as rebuild_mirror does from K, so that both give the same bytes. The cells come from
// the mirror indices of the tokens' first elements (c: kt_idxs).
static void write_mirror_i8(ggml_tensor * dst, const ggml_tensor * a, const ggml_tensor * b, const ggml_tensor * c,
                            int ith, int nth, void * userdata) {
    GGML_UNUSED(dst);
    GGML_UNUSED(userdata);
    const int64_t kv_size = a->ne[0], rows = a->ne[1], n_embd = b->ne[0];
    const int64_t n_head = rows - n_embd, d = n_embd/n_head;
    const int64_t n_tokens = c->ne[0]/n_embd;
    const int64_t * idx = (const int64_t *) c->data;
    const auto * traits = ggml_get_type_traits(b->type);
    std::vector<float> kf(n_embd);
    for (int64_t t = ith; t < n_tokens; t += nth) {
        const int64_t i0 = idx[t*n_embd];  // strm*kv_size*n_embd + cell
        const int64_t cell = i0 % kv_size, strm = i0/(kv_size*n_embd);
        const char * krow = (const char *) b->data + cell*b->nb[1] + strm*b->nb[2];
        if (b->type == GGML_TYPE_F32) {
            memcpy(kf.data(), krow, n_embd*sizeof(float));
        } else {
            traits->to_float(krow, kf.data(), n_embd);
        }
        ggml_sparq_quantize_kt_heads(kf.data(), d, d, n_head, (int8_t *) a->data + strm*rows*kv_size + cell, kv_size);
    }
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
    llama_kv_cache * kv = cache_internals::kv(mctx);
    if (kv == nullptr || !kv->sparq || !kv->sparq->enabled || kv->sparq->n_eligible == 0) {
        return nullptr;
    }
    auto inp = std::make_unique<llm_graph_input_sparq>();
    inp->mctx       = mctx;
    inp->st         = kv->sparq;
    inp->generation = kv->sparq->generation;
    inp->n_kv       = mctx->get_n_kv();
    inp->use_op     = use_sparq(*kv->sparq, ubatch, cparams, inp->n_kv);
    inp->n_plan     = inp->n_plan_min = inp->n_kv;
    if (inp->use_op && kv->sparq->n_ops > 0) {
        std::tie(inp->n_plan_min, inp->n_plan) = visible_range(*kv, ubatch, inp->n_kv);
    }

    inp->n_tokens   = ubatch.n_tokens;

    if (inp->use_op && kv->sparq->realloc) {
        inp->vsum = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, kv->sparq->vsum_size, ubatch.n_tokens);
        ggml_set_input(inp->vsum);
        ggml_set_name(inp->vsum, "sparq_inp_vsum");
        inp->inv_cnt = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, 1, ubatch.n_tokens);
        ggml_set_input(inp->inv_cnt);
        ggml_set_name(inp->inv_cnt, "sparq_inp_inv_cnt");
    }
    if (inp->use_op && kv->sparq->n_ops > 0) {
        inp->vis_rank = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, inp->n_kv, ubatch.n_tokens);
        ggml_set_input(inp->vis_rank);
        ggml_set_name(inp->vis_rank, "sparq_inp_vis_rank");
    }
    return (llm_graph_input_sparq *) res->add_input(std::move(inp));
}

bool llm_graph_input_sparq::can_reuse(const llm_graph_params & params) {
    const llama_kv_cache_context * m = nullptr;
    if (auto * iswa = dynamic_cast<const llama_kv_cache_iswa_context *>(params.mctx)) {
        m = iswa->get_base();
    } else if (auto * hyb = dynamic_cast<const llama_memory_hybrid_context *>(params.mctx)) {
        m = hyb->get_attn();
    } else if (auto * hyb = dynamic_cast<const llama_memory_hybrid_iswa_context *>(params.mctx)) {
        m = hyb->get_attn()->get_base();
    } else {
        m = dynamic_cast<const llama_kv_cache_context *>(params.mctx);
    }
    if (m == nullptr || cache_internals::kv(m) == nullptr || cache_internals::kv(m)->sparq != st || st->generation != generation) {
        return false;
    }
    if (m->get_n_kv() != n_kv || (int64_t) params.ubatch.n_tokens != n_tokens) {
        return false;
    }
    if (use_sparq(*st, params.ubatch, params.cparams, n_kv) != use_op) {
        return false;
    }
    if (use_op && st->n_ops > 0) {
        // the portable graph's k follows the longest sequence: a new graph when k or l changes,
        // or when whether the shortest sees k cells does
        const auto [lo, hi] = visible_range(*cache_internals::kv(m), params.ubatch, n_kv);
        for (const auto & li : layers) {
            if (!li.fused) {
                const llama_sparq_layer_cfg c = llama_sparq_resolve(st->params, li.d, hi, &li.bytes);
                if (c.k != li.cfg.k || c.l != li.cfg.l || (lo >= c.k) != (n_plan_min >= c.k)) {
                    return false;
                }
            }
        }
    }
    mctx = m;
    return true;
}

void llm_graph_input_sparq::set_input(const llama_ubatch * ubatch) {
    llama_kv_cache & kv = *cache_internals::kv(mctx);
    const auto & sinfo = cache_internals::sinfo(mctx);
    const uint32_t kv_size = kv.get_size();

    // 1. where each K element of the ubatch goes in the mirror (of each K width)
    for (const auto & [n_embd, t] : kt_idxs) {
        if (t->buffer == nullptr) {
            continue;
        }
        GGML_ASSERT(ggml_backend_buffer_is_host(t->buffer));
        int64_t * idx = (int64_t *) t->data;
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
        st->rebuild_mirror(kv);
        st->k_dirty = false;
    }

    // 3. running V sums
    std::vector<int64_t> n_vis(ubatch->n_tokens, 0);
    if (st->realloc) {
        float * vs = nullptr;
        float * ic = nullptr;
        // (no buffer: no layer of this graph read them, each took the dense path at build time)
        if (use_op && vsum->buffer != nullptr && inv_cnt->buffer != nullptr) {
            GGML_ASSERT(ggml_backend_buffer_is_host(vsum->buffer) && ggml_backend_buffer_is_host(inv_cnt->buffer));
            vs = (float *) vsum->data;
            ic = (float *) inv_cnt->data;
        }
        st->sync_sums(kv, sinfo, *ubatch, vs, ic, n_vis);
    }

    // 4. the portable graph's visible ranks (the same visibility as upstream's KQ mask: a cell of
    // the token's sequence at a position <= the token's)
    if (vis_rank != nullptr && vis_rank->buffer != nullptr) {
        GGML_ASSERT(ggml_backend_buffer_is_host(vis_rank->buffer));
        float * rk = (float *) vis_rank->data;
        for (uint32_t i = 0; i < ubatch->n_tokens; ++i) {
            const llama_seq_id q = ubatch->seq_id[i][0];
            const llama_pos    p = ubatch->pos[i];
            const auto & cells = cache_internals::cells(kv, kv.get_stream(q));
            float * row = rk + (size_t) i*n_kv;
            float rank = 0.0f;
            for (int64_t c = (int64_t) n_kv - 1; c >= 0; --c) {
                const bool vis = !cells.is_empty(c) && cells.seq_has(c, q) && cells.pos_get(c) <= p;
                row[c] = vis ? rank : SPARQ_RANK_HIDDEN;
                rank += vis ? 1.0f : 0.0f;
            }
        }
    }

    // 5. counters: what each query read, with its own budget (the fused op's query_budget: a
    // sequence shorter than min_ctx attends densely; the portable graph selects k for every query)
    if (use_op) {
        const bool all_fused = std::all_of(layers.begin(), layers.end(), [](const layer_info & li) { return li.fused; });
        for (uint32_t i = 0; i < ubatch->n_tokens; ++i) {
            const int64_t S = n_vis[i] > 0 ? n_vis[i] : std::min<int64_t>((int64_t) ubatch->pos[i] + 1, n_kv);
            if (all_fused && S < st->min_ctx) {
                st->stats.n_tokens_dense += 1;
                continue;
            }
            st->stats.n_tokens_sparq += 1;
            for (const auto & li : layers) {
                st->stats.bytes_attn_sparq += li.n_head_kv*llama_sparq_read(li.cfg, li.bytes, S, li.fused, li.vmean_bytes).bytes;
                st->stats.bytes_attn_dense += li.n_head_kv*(S*li.bytes.kv_row);
            }
        }
    } else {
        st->stats.n_tokens_dense += ubatch->n_tokens;
    }
}

// The bias for window l (ggml_sparq_window_bias) of every stream, built once per graph and shared
// by the layers.
static ggml_tensor * window_bias(ggml_context * ctx0, llm_graph_input_sparq * inp, ggml_tensor * kq_mask, int32_t l) {
    ggml_tensor *& b = inp->bias[l];
    if (b == nullptr) {
        const int64_t n_kv = kq_mask->ne[0], T = kq_mask->ne[1], ns = kq_mask->ne[3];
        b = ggml_sparq_window_bias(ctx0, kq_mask, ggml_reshape_4d(ctx0, inp->vis_rank, n_kv, T, 1, ns), l);
    }
    return b;
}

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
    const llama_kv_cache & kv = *cache_internals::kv(inp->mctx);
    const int32_t ikv = cache_internals::ikv(kv, il);
    if (ikv < 0 || (size_t) ikv >= st.kt.size() || st.kt[ikv] == nullptr) {
        return nullptr;
    }
    ggml_tensor * kt = st.kt[ikv];

    // the mirror element of each K element of the ubatch, for this layer's K width
    const int64_t n_embd_k = cache_internals::k(kv, ikv)->ne[0];
    ggml_tensor *& idxs = inp->kt_idxs[n_embd_k];
    if (idxs == nullptr) {
        idxs = ggml_new_tensor_1d(ctx0, GGML_TYPE_I64, inp->n_tokens*n_embd_k);
        ggml_set_input(idxs);
        ggml_format_name(idxs, "sparq_inp_kt_idxs_%d", (int) n_embd_k);
    }

    // the mirror: every element of k_cur is a row of the flattened K^T; an I8 mirror is
    // quantized from K's cells once they hold this ubatch's keys
    if (kt->type == GGML_TYPE_I8) {
        ggml_build_forward_expand(gf, ggml_map_custom3_inplace(ctx0, kt, cache_internals::k(kv, ikv), idxs,
                                                               write_mirror_i8, GGML_N_TASKS_MAX, nullptr));
    } else {
        ggml_tensor * kc = ggml_is_contiguous(k_cur) ? k_cur : ggml_cont(ctx0, k_cur);
        kc = ggml_reshape_2d(ctx0, kc, 1, ggml_nelements(kc));
        ggml_tensor * dst = ggml_reshape_2d(ctx0, kt, 1, ggml_nelements(kt));
        ggml_build_forward_expand(gf, ggml_set_rows(ctx0, dst, kc, idxs));
    }

    if (!inp->use_op || kq_b != nullptr) {
        return nullptr;
    }

    const int64_t d         = q->ne[0];
    const int64_t n_tokens  = q->ne[2];
    const int64_t n_head_kv = k->ne[1];
    const int64_t n_kv      = k->ne[2];
    const int64_t ns        = k->ne[3];
    const int64_t kv_size   = kv.get_size();
    const int64_t n_rows    = kt->ne[1];            // n_head_kv*d, or n_head_kv*(d + 1) for I8
    const int64_t drow      = n_rows/n_head_kv;     // the mirror's rows per head
    const size_t  ts        = ggml_type_size(kt->type);

    // as build_attn_mha: split the tokens into streams, then [D, n_tokens, n_head, ns]
    ggml_tensor * q4 = ggml_view_4d(ctx0, q, d, q->ne[1], n_tokens/ns, ns, q->nb[1], q->nb[2], q->nb[2]*(n_tokens/ns), 0);
    q4 = ggml_permute(ctx0, q4, 0, 2, 1, 3);
    ggml_tensor * k4 = ggml_permute(ctx0, k, 0, 2, 1, 3);
    ggml_tensor * v4 = ggml_permute(ctx0, v, 0, 2, 1, 3);
    ggml_tensor * kt4 = ggml_view_4d(ctx0, kt, n_kv, drow, n_head_kv, ns,
            kv_size*ts, drow*kv_size*ts, n_rows*kv_size*ts, n_rows*kv_size*ts*cache_internals::sinfo(inp->mctx).s0);

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

    // the fused op: k for the cache length (each query then takes its own share); the portable
    // graph, one k for all its queries: the longest sequence's
    const llama_sparq_bytes bytes = llama_sparq_layer_bytes(kt->type, k->type, v->type, d, v->ne[0]);
    const llama_sparq_layer_cfg cfg = llama_sparq_resolve(st.params, d, st.ops[ikv] ? inp->n_plan : inp->n_kv, &bytes);
    inp->layers.push_back({ n_head_kv, d, cfg, bytes, st.realloc ? v->ne[0]*sizeof(float) : 0.0, !st.ops[ikv] });

    if (!st.ops[ikv]) {
        ggml_tensor * cur = ggml_sparq_attn(ctx0, q4, k4, kt4, v4, vmean, kq_mask, kq_scale, cfg.r, cfg.k, cfg.l, flags);
        ggml_sparq_attn_set_budget(cur, cfg.k_frac, cfg.l_div, cfg.min_vis);  // each sequence by its own length
        ggml_sparq_attn_add_sinks(cur, sinks);
        return ggml_reshape_2d(ctx0, cur, cur->ne[0]*cur->ne[1], cur->ne[2]*cur->ne[3]);
    }

    // the portable graph: one k for every query of the ubatch; where every query sees k cells,
    // no hidden one can be chosen
    if (inp->n_plan_min >= cfg.k) {
        flags |= GGML_SPARQ_ALL_SEE_K;
    }
    flags |= st.ops_flags[ikv];
    if (kq_mask->type != GGML_TYPE_F16 && inp->mask_f16 == nullptr) {
        inp->mask_f16 = ggml_cast(ctx0, kq_mask, GGML_TYPE_F16);
    }
    ggml_tensor * mask = kq_mask->type == GGML_TYPE_F16 ? kq_mask : inp->mask_f16;
    ggml_tensor * cur = ggml_sparq_attn_ops(ctx0, q4, k4, kt4, v4, vmean, mask, window_bias(ctx0, inp, kq_mask, cfg.l),
                                            sinks, kq_scale, cfg.r, cfg.k, flags);
    return ggml_reshape_2d(ctx0, cur, cur->ne[0]*cur->ne[1], cur->ne[2]*cur->ne[3]);
}
