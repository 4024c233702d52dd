// sparq-cpp: SparQ in libllama's decode graph. One graph input per ubatch
// (llm_graph_input_sparq: where the new K goes in the mirror, the V sums, the counters) and, per
// attention layer, the mirror write and the SparQ branch (llama_sparq_build_attn), which the
// hooks in upstream's build_attn call (native/patches/0004). The branch is GGML_OP_SPARQ_ATTN
// (the fused op) where the layer's backend has it, or the same computation built from standard
// ggml ops (build_portable), which every backend runs; llama-sparq.cpp decides per layer.
#include "llama-sparq-impl.h"
#include "llama-sparq-kv.h"

#include "llama-graph.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"

#include <algorithm>
#include <map>
#include <memory>
#include <utility>
#include <vector>

// the portable graph forces the local window into the selection with this bonus on its scores
// (the group's summed approximate scores are at most the group size)
static constexpr float SPARQ_WINDOW_BONUS = 1e30f;
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
    bool     use_op     = false;         // this ubatch takes SparQ

    ggml_tensor * kt_idxs = nullptr;     // I64 [n_tokens*n_embd_kt]: mirror element of each K element
    ggml_tensor * vsum    = nullptr;     // F32 [vsum_size, n_tokens]: V sum of the token's sequence, before it
    ggml_tensor * inv_cnt = nullptr;     // F32 [1, n_tokens]: 1/(cells in that sum + 1)

    // portable graph (layers without the fused op): per token and cell, the cell's rank among the
    // token's visible cells counted from the last one (0), SPARQ_RANK_HIDDEN when not visible
    ggml_tensor * vis_rank = nullptr;    // F32 [n_kv, n_tokens]
    std::map<std::pair<int64_t, int32_t>, ggml_tensor *> bias;  // (stream, l): mask + window bonus

    struct layer_info { int64_t n_head_kv, d, r, k, type_size; };
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
    } else {
        m = dynamic_cast<const llama_kv_cache_context *>(params.mctx);
    }
    if (m == nullptr || cache_internals::kv(m) == nullptr || cache_internals::kv(m)->sparq != st || st->generation != generation) {
        return false;
    }
    if (m->get_n_kv() != n_kv || kt_idxs->ne[0] != (int64_t) params.ubatch.n_tokens*st->n_embd_kt) {
        return false;
    }
    if (use_sparq(*st, params.ubatch, params.cparams, n_kv) != use_op) {
        return false;
    }
    mctx = m;
    return true;
}

void llm_graph_input_sparq::set_input(const llama_ubatch * ubatch) {
    llama_kv_cache & kv = *cache_internals::kv(mctx);
    const auto & sinfo = cache_internals::sinfo(mctx);
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
        st->rebuild_mirror(kv);
        st->k_dirty = false;
    }

    // 3. running V sums
    std::vector<int64_t> n_vis(ubatch->n_tokens, 0);
    if (st->realloc) {
        float * vs = nullptr;
        float * ic = nullptr;
        if (use_op) {
            GGML_ASSERT(ggml_backend_buffer_is_host(vsum->buffer) && ggml_backend_buffer_is_host(inv_cnt->buffer));
            vs = (float *) vsum->data;
            ic = (float *) inv_cnt->data;
        }
        st->sync_sums(kv, sinfo, *ubatch, vs, ic, n_vis);
    }

    // 4. the portable graph's visible ranks (the same visibility as upstream's KQ mask: a cell of
    // the token's sequence at a position <= the token's)
    if (vis_rank != nullptr) {
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

    // 5. counters
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

// The mask and local-window bonus of stream s for window l, [n_kv, T]: -INF where the token
// cannot see the cell, SPARQ_WINDOW_BONUS on its last l visible cells, else 0. Built once per
// graph and shared by the layers.
static ggml_tensor * window_bias(ggml_context * ctx0, llm_graph_input_sparq * inp, ggml_tensor * kq_mask, int64_t s, int32_t l) {
    auto it = inp->bias.find({ s, l });
    if (it != inp->bias.end()) {
        return it->second;
    }
    const int64_t n_kv = kq_mask->ne[0], T = kq_mask->ne[1];
    ggml_tensor * m = ggml_view_2d(ctx0, kq_mask, n_kv, T, kq_mask->nb[1], s*kq_mask->nb[3]);
    m = ggml_cast(ctx0, m, GGML_TYPE_F32);
    ggml_tensor * rk = ggml_view_2d(ctx0, inp->vis_rank, n_kv, T, inp->vis_rank->nb[1], s*T*inp->vis_rank->nb[1]);
    // rank < l  <=>  l - 0.5 - rank > 0
    ggml_tensor * w = ggml_step(ctx0, ggml_scale_bias(ctx0, rk, -1.0f, (float) l - 0.5f));
    ggml_tensor * b = ggml_add(ctx0, m, ggml_scale(ctx0, w, SPARQ_WINDOW_BONUS));
    inp->bias[{ s, l }] = b;
    return b;
}

// SparQ for the T tokens of one stream from standard ggml ops (docs/sparq.md, "The portable
// graph"). Shapes: q [D, G, Hkv, T] (a view), kt [n_kv, D, Hkv] (the mirror), k and v
// [D, n_kv, Hkv] (the cache, rows of cells), vmean [Dv, 1, T, Hkv] or null, bias [n_kv, T].
// Returns [Dv*G*Hkv, T]. Each step reads what the fused op reads: r rows of the mirror, k rows
// of K and V (gathered before attention, so the bytes read fall with the budget).
static ggml_tensor * build_portable(ggml_context * ctx0, ggml_tensor * q, ggml_tensor * kt, ggml_tensor * k,
        ggml_tensor * v, ggml_tensor * vmean, ggml_tensor * bias, float scale, const llama_sparq_layer_cfg & cfg, bool no_tau) {
    const int64_t D = q->ne[0], G = q->ne[1], Hkv = q->ne[2], T = q->ne[3];
    const int64_t n_kv = kt->ne[0], Dv = v->ne[0];
    const int64_t r = cfg.r, kk = cfg.k;

    // step 1: i1 = top-r components of the group's summed |q| [r, T, Hkv]
    ggml_tensor * qg = ggml_cont(ctx0, ggml_permute(ctx0, q, 1, 0, 3, 2));            // [G, D, T, Hkv]
    ggml_tensor * qa = ggml_sum_rows(ctx0, ggml_abs(ctx0, qg));                         // [1, D, T, Hkv]
    ggml_tensor * i1 = ggml_top_k(ctx0, ggml_reshape_2d(ctx0, qa, D, T*Hkv), (int) r); // [r, T*Hkv]
    ggml_tensor * qs = ggml_get_rows(ctx0, qg, ggml_reshape_3d(ctx0, i1, r, T, Hkv));  // [G, r, T, Hkv]
    qs = ggml_cont(ctx0, ggml_permute(ctx0, qs, 1, 0, 2, 3));                           // [r, G, T, Hkv]
    ggml_tensor * qp = ggml_cont(ctx0, ggml_permute(ctx0, q, 0, 1, 3, 2));             // [D, G, T, Hkv]

    // step 2: approximate scores from r rows of the mirror, scaled by tau, masked, softmax
    ggml_tensor * kr = ggml_get_rows(ctx0, kt, ggml_reshape_2d(ctx0, i1, r*T, Hkv));    // [n_kv, r*T, Hkv]
    kr = ggml_reshape_4d(ctx0, kr, n_kv, r, T, Hkv);
    kr = ggml_cont(ctx0, ggml_permute(ctx0, kr, 1, 0, 2, 3));                           // [r, n_kv, T, Hkv]
    ggml_tensor * sh = ggml_mul_mat(ctx0, kr, qs);                                      // [n_kv, G, T, Hkv]
    if (no_tau) {
        sh = ggml_scale(ctx0, sh, scale);
    } else {
        // scale / sqrt(|q[i1]|_1 / |q|_1) per head; the tiny bias makes an all-zero q give 1
        ggml_tensor * l1  = ggml_scale_bias(ctx0, ggml_sum_rows(ctx0, ggml_abs(ctx0, qp)), 1.0f, 1e-30f);
        ggml_tensor * l1s = ggml_scale_bias(ctx0, ggml_sum_rows(ctx0, ggml_abs(ctx0, qs)), 1.0f, 1e-30f);
        ggml_tensor * f = ggml_scale(ctx0, ggml_sqrt(ctx0, ggml_div(ctx0, l1, l1s)), scale); // [1, G, T, Hkv]
        sh = ggml_mul(ctx0, sh, f);
    }
    ggml_tensor * m4 = ggml_reshape_4d(ctx0, bias, n_kv, 1, T, 1);
    // the bias' window bonus must not reach the softmax: only its mask part (-INF) does, via a
    // clamp to [-1, 0] scaled back up; the bonus enters at step 3
    ggml_tensor * mask = ggml_scale(ctx0, ggml_clamp(ctx0, m4, -1.0f, 0.0f), SPARQ_WINDOW_BONUS);
    sh = ggml_soft_max(ctx0, ggml_add(ctx0, sh, mask));                                 // s_hat [n_kv, G, T, Hkv]

    // step 3: i2 = top-k of the group's summed s_hat, the local window forced in by the bias
    ggml_tensor * shg = G > 1 ? ggml_cont(ctx0, ggml_permute(ctx0, sh, 1, 0, 2, 3))    // [G, n_kv, T, Hkv]
                              : ggml_reshape_4d(ctx0, sh, 1, n_kv, T, Hkv);
    ggml_tensor * gs = G > 1 ? ggml_sum_rows(ctx0, shg) : shg;                          // [1, n_kv, T, Hkv]
    gs = ggml_add(ctx0, ggml_reshape_3d(ctx0, gs, n_kv, T, Hkv), ggml_reshape_3d(ctx0, bias, n_kv, T, 1));
    ggml_tensor * i2 = ggml_top_k(ctx0, gs, (int) kk);                                  // [kk, T, Hkv]

    // step 5: exact attention over the kk gathered rows of K and V; a gathered cell the token
    // cannot see (only when it sees fewer than kk) gets the mask
    ggml_tensor * i2r = ggml_reshape_2d(ctx0, i2, kk*T, Hkv);
    ggml_tensor * ks = ggml_reshape_4d(ctx0, ggml_get_rows(ctx0, k, i2r), D,  kk, T, Hkv);
    ggml_tensor * vs = ggml_reshape_4d(ctx0, ggml_get_rows(ctx0, v, i2r), Dv, kk, T, Hkv);
    ggml_tensor * ms = ggml_get_rows(ctx0, ggml_reshape_4d(ctx0, gs, 1, n_kv, T, Hkv), i2);   // [1, kk, T, Hkv]
    ms = ggml_scale(ctx0, ggml_clamp(ctx0, ggml_reshape_4d(ctx0, ms, kk, 1, T, Hkv), -1.0f, 0.0f), SPARQ_WINDOW_BONUS);
    ggml_tensor * a = ggml_mul_mat(ctx0, ks, qp);                                       // [kk, G, T, Hkv]
    a = ggml_soft_max(ctx0, ggml_add(ctx0, ggml_scale(ctx0, a, scale), ms));
    ggml_tensor * y = ggml_mul_mat(ctx0, ggml_cont(ctx0, ggml_permute(ctx0, vs, 1, 0, 2, 3)), a); // [Dv, G, T, Hkv]

    // steps 4 and 6: alpha = s_hat over the chosen rows, per head; y = v_mean + alpha (y - v_mean)
    if (vmean != nullptr) {
        ggml_tensor * sel = ggml_get_rows(ctx0, shg, i2);                               // [G, kk, T, Hkv]
        ggml_tensor * alpha = ggml_sum_rows(ctx0, G > 1 ? ggml_cont(ctx0, ggml_permute(ctx0, sel, 1, 0, 2, 3))
                                                        : ggml_reshape_4d(ctx0, sel, kk, 1, T, Hkv)); // [1, G, T, Hkv]
        y = ggml_add(ctx0, ggml_mul(ctx0, ggml_sub(ctx0, y, vmean), alpha), vmean);
    }
    y = ggml_cont(ctx0, ggml_permute(ctx0, y, 0, 1, 3, 2));                             // [Dv, G, Hkv, T]
    return ggml_reshape_2d(ctx0, y, Dv*G*Hkv, T);
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
            kv_size*ts, d*kv_size*ts, n_embd*kv_size*ts, n_embd*kv_size*ts*cache_internals::sinfo(inp->mctx).s0);

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

    const llama_sparq_layer_cfg cfg = llama_sparq_resolve(st.params, d, inp->n_kv);
    inp->layers.push_back({ n_head_kv, d, cfg.r, cfg.k, (int64_t) ts });

    if (!st.ops[ikv]) {
        ggml_tensor * cur = ggml_sparq_attn(ctx0, q4, k4, kt4, v4, vmean, kq_mask, kq_scale, cfg.r, cfg.k, cfg.l, flags);
        return ggml_reshape_2d(ctx0, cur, cur->ne[0]*cur->ne[1], cur->ne[2]*cur->ne[3]);
    }

    // the portable graph, one stream at a time
    const int64_t G = q->ne[1]/n_head_kv, T = n_tokens/ns;
    ggml_tensor * out = nullptr;
    for (int64_t s = 0; s < ns; ++s) {
        ggml_tensor * qs = ggml_view_4d(ctx0, q, d, G, n_head_kv, T, q->nb[1], G*q->nb[1], q->nb[2], s*T*q->nb[2]);
        ggml_tensor * kts = ggml_view_3d(ctx0, kt4, n_kv, d, n_head_kv, kt4->nb[1], kt4->nb[2], s*kt4->nb[3]);
        ggml_tensor * ks = ggml_view_3d(ctx0, k4, k4->ne[0], n_kv, n_head_kv, k4->nb[1], k4->nb[2], s*k4->nb[3]);
        ggml_tensor * vs = ggml_view_3d(ctx0, v4, v4->ne[0], n_kv, n_head_kv, v4->nb[1], v4->nb[2], s*v4->nb[3]);
        ggml_tensor * vm = nullptr;
        if (vmean != nullptr) {
            vm = ggml_view_4d(ctx0, vmean, vmean->ne[0], 1, T, n_head_kv, vmean->nb[1], vmean->nb[2], vmean->nb[1], s*vmean->nb[3]);
            vm = ggml_cont(ctx0, vm);                                                   // [Dv, 1, T, Hkv]
        }
        ggml_tensor * bias = window_bias(ctx0, inp, kq_mask, s, cfg.l);
        ggml_tensor * y = build_portable(ctx0, qs, kts, ks, vs, vm, bias, kq_scale, cfg, st.params.no_tau);
        out = out == nullptr ? y : ggml_concat(ctx0, out, y, 1);
    }
    return out;
}
