// sparq-cpp: SparQ attention built from standard ggml ops (the "portable graph"), for backends
// without a GGML_OP_SPARQ_ATTN kernel: every op here (top_k, get_rows, mul_mat, soft_max,
// sum_rows, ...) exists on CPU, CUDA, Vulkan and Metal. Same steps and semantics as the fused op
// (docs/sparq.md); what differs is where ties among equal scores go and the float rounding.
// Each step reads only what SparQ reads: r rows of the K^T mirror (step 2), and the k chosen rows
// of K and V, gathered before the attention (step 5), so the bytes read fall with the budget.
#include "ggml.h"
#include "ggml-impl.h"

#include <algorithm>
#include <cmath>

void ggml_sparq_attn_set_budget(struct ggml_tensor * a, float k_frac, int32_t l_div, int32_t min_vis) {
    GGML_ASSERT(a->op == GGML_OP_SPARQ_ATTN);
    GGML_ASSERT(k_frac >= 0.0f && k_frac <= 1.0f && l_div >= 0 && min_vis >= 0);
    ggml_set_op_params_f32(a, 6, k_frac);
    ggml_set_op_params_i32(a, 7, l_div);
    ggml_set_op_params_i32(a, 8, min_vis);
}

void ggml_sparq_attn_add_sinks(struct ggml_tensor * a, struct ggml_tensor * sinks) {
    GGML_ASSERT(a->op == GGML_OP_SPARQ_ATTN);
    if (sinks == nullptr) {
        a->src[6] = nullptr;
        return;
    }
    GGML_ASSERT(sinks->type == GGML_TYPE_F32 && ggml_is_contiguous(sinks));
    GGML_ASSERT(ggml_nelements(sinks) == a->src[0]->ne[2]);  // one per query head
    a->src[6] = sinks;
}

struct ggml_tensor * ggml_sparq_window_bias(
        struct ggml_context * ctx,
        struct ggml_tensor  * mask,
        struct ggml_tensor  * rank,
        int32_t               l) {
    GGML_ASSERT(ggml_are_same_shape(mask, rank) && rank->type == GGML_TYPE_F32);
    ggml_tensor * m = mask->type == GGML_TYPE_F32 ? mask : ggml_cast(ctx, mask, GGML_TYPE_F32);
    // rank < l  <=>  l - 0.5 - rank > 0
    ggml_tensor * w = ggml_step(ctx, ggml_scale_bias(ctx, rank, -1.0f, (float) l - 0.5f));
    return ggml_add(ctx, m, ggml_scale(ctx, w, GGML_SPARQ_WINDOW_BONUS));
}

// the mask part of a bias (or of gathered scores): 0 where >= 0, -GGML_SPARQ_WINDOW_BONUS where
// -INF (a clamp to [-1, 0], scaled back up), so that the window bonus itself never reaches a softmax
static ggml_tensor * mask_of(ggml_context * ctx, ggml_tensor * x) {
    return ggml_scale(ctx, ggml_clamp(ctx, x, -1.0f, 0.0f), GGML_SPARQ_WINDOW_BONUS);
}

// [a, b, c, d] -> [b, a, c, d], contiguous
static ggml_tensor * swap01(ggml_context * ctx, ggml_tensor * x) {
    return ggml_cont(ctx, ggml_permute(ctx, x, 1, 0, 2, 3));
}

// softmax over the rows of x [n, G, T, Hkv] with, where sinks [G*Hkv] is given, one more logit
// per head (a learned attention sink: weight in the denominator, no value row): the weights of
// x's n entries, contiguous, and in *sink_w (if asked) the sink's own weight [1, G, T, Hkv]
static ggml_tensor * soft_max_sinks(ggml_context * ctx, ggml_tensor * x, ggml_tensor * sinks, ggml_tensor ** sink_w) {
    if (sinks == nullptr) {
        return ggml_soft_max(ctx, x);
    }
    const int64_t n = x->ne[0], G = x->ne[1], T = x->ne[2], Hkv = x->ne[3];
    ggml_tensor * col = ggml_repeat_4d(ctx, ggml_reshape_4d(ctx, sinks, 1, G, 1, Hkv), 1, G, T, Hkv);
    ggml_tensor * w = ggml_soft_max(ctx, ggml_concat(ctx, x, col, 0));               // [n + 1, G, T, Hkv]
    if (sink_w != nullptr) {
        *sink_w = ggml_cont(ctx, ggml_view_4d(ctx, w, 1, G, T, Hkv, w->nb[1], w->nb[2], w->nb[3], n*w->nb[0]));
    }
    return ggml_cont(ctx, ggml_view_4d(ctx, w, n, G, T, Hkv, w->nb[1], w->nb[2], w->nb[3], 0));
}

struct ggml_tensor * ggml_sparq_attn_ops(
        struct ggml_context * ctx,
        struct ggml_tensor  * q,
        struct ggml_tensor  * k,
        struct ggml_tensor  * kt,
        struct ggml_tensor  * v,
        struct ggml_tensor  * vmean,
        struct ggml_tensor  * bias,
        struct ggml_tensor  * sinks,
        float                 scale,
        int32_t               r,
        int32_t               k_top,
        int32_t               flags) {
    const int64_t D = q->ne[0], G = q->ne[1], Hkv = q->ne[2], T = q->ne[3];
    const int64_t n_kv = kt->ne[0], Dv = v->ne[0];
    GGML_ASSERT(q->type == GGML_TYPE_F32 && bias->type == GGML_TYPE_F32);
    GGML_ASSERT(k->ne[0] == D && k->ne[1] == n_kv && k->ne[2] == Hkv && k->ne[3] == 1);
    GGML_ASSERT(kt->ne[1] == D && kt->ne[2] == Hkv && kt->ne[3] == 1);
    GGML_ASSERT(v->ne[1] == n_kv && v->ne[2] == Hkv && v->ne[3] == 1);
    GGML_ASSERT(bias->ne[0] == n_kv && bias->ne[1] == T && ggml_is_contiguous(bias));
    GGML_ASSERT(r >= 1 && r <= D && k_top >= 1 && k_top <= n_kv);
    GGML_ASSERT((vmean != nullptr) == ((flags & GGML_SPARQ_REALLOC) != 0));
    GGML_ASSERT(sinks == nullptr || (sinks->type == GGML_TYPE_F32 && ggml_nelements(sinks) == G*Hkv && ggml_is_contiguous(sinks)));

    // step 1: i1 = the top-r components of the group's summed |q| [r, T, Hkv]
    ggml_tensor * qg = ggml_cont(ctx, ggml_permute(ctx, q, 1, 0, 3, 2));            // [G, D, T, Hkv]
    ggml_tensor * qa = ggml_sum_rows(ctx, ggml_abs(ctx, qg));                        // [1, D, T, Hkv]
    ggml_tensor * i1 = ggml_top_k(ctx, ggml_reshape_2d(ctx, qa, D, T*Hkv), r);       // [r, T*Hkv]
    ggml_tensor * qs = swap01(ctx, ggml_get_rows(ctx, qg, ggml_reshape_3d(ctx, i1, r, T, Hkv))); // [r, G, T, Hkv]
    ggml_tensor * qp = ggml_cont(ctx, ggml_permute(ctx, q, 0, 1, 3, 2));            // [D, G, T, Hkv]

    // step 2: approximate scores from r rows of the mirror, scaled by tau, masked; softmax
    ggml_tensor * kr = ggml_get_rows(ctx, kt, ggml_reshape_2d(ctx, i1, (int64_t) r*T, Hkv)); // [n_kv, r*T, Hkv]
    kr = swap01(ctx, ggml_reshape_4d(ctx, kr, n_kv, r, T, Hkv));                     // [r, n_kv, T, Hkv]
    ggml_tensor * sh = ggml_mul_mat(ctx, kr, qs);                                    // [n_kv, G, T, Hkv]
    if (flags & GGML_SPARQ_NO_TAU) {
        sh = ggml_scale(ctx, sh, scale);
    } else {
        // scale / sqrt(|q[i1]|_1 / |q|_1) per head; the tiny bias gives an all-zero q the ratio 1
        ggml_tensor * l1  = ggml_scale_bias(ctx, ggml_sum_rows(ctx, ggml_abs(ctx, qp)), 1.0f, 1e-30f);
        ggml_tensor * l1s = ggml_scale_bias(ctx, ggml_sum_rows(ctx, ggml_abs(ctx, qs)), 1.0f, 1e-30f);
        sh = ggml_mul(ctx, sh, ggml_scale(ctx, ggml_sqrt(ctx, ggml_div(ctx, l1, l1s)), scale)); // tau: [1, G, T, Hkv]
    }
    ggml_tensor * sink_hat = nullptr;                                                 // the sink's s_hat
    sh = soft_max_sinks(ctx, ggml_add(ctx, sh, mask_of(ctx, ggml_reshape_4d(ctx, bias, n_kv, 1, T, 1))), sinks,
                        vmean != nullptr ? &sink_hat : nullptr);                      // s_hat

    // step 3: i2 = the top k of the group's summed s_hat, the local window forced in by the bias
    ggml_tensor * shg = G > 1 ? swap01(ctx, sh) : ggml_reshape_4d(ctx, sh, 1, n_kv, T, Hkv); // [G, n_kv, T, Hkv]
    ggml_tensor * gs  = G > 1 ? ggml_sum_rows(ctx, shg) : shg;                        // [1, n_kv, T, Hkv]
    gs = ggml_add(ctx, ggml_reshape_3d(ctx, gs, n_kv, T, Hkv), ggml_reshape_3d(ctx, bias, n_kv, T, 1));
    ggml_tensor * i2 = ggml_top_k(ctx, gs, k_top);                                    // [k, T, Hkv]

    // step 5: exact attention over the k gathered rows of K and V; a gathered cell the query
    // cannot see (it sees fewer than k) is masked
    ggml_tensor * i2r = ggml_reshape_2d(ctx, i2, (int64_t) k_top*T, Hkv);
    ggml_tensor * ks = ggml_reshape_4d(ctx, ggml_get_rows(ctx, k, i2r), D,  k_top, T, Hkv);
    ggml_tensor * vs = ggml_reshape_4d(ctx, ggml_get_rows(ctx, v, i2r), Dv, k_top, T, Hkv);
    ggml_tensor * ms = ggml_get_rows(ctx, ggml_reshape_4d(ctx, gs, 1, n_kv, T, Hkv), i2);   // [1, k, T, Hkv]
    ms = mask_of(ctx, ggml_reshape_4d(ctx, ms, k_top, 1, T, Hkv));
    ggml_tensor * a = ggml_mul_mat(ctx, ks, qp);                                     // [k, G, T, Hkv]
    a = soft_max_sinks(ctx, ggml_add(ctx, ggml_scale(ctx, a, scale), ms), sinks, nullptr);
    ggml_tensor * y = ggml_mul_mat(ctx, swap01(ctx, vs), a);                          // [Dv, G, T, Hkv]

    // steps 4 and 6: alpha = s_hat summed over the chosen rows (and the sink, always chosen), per
    // head; y = vmean + alpha (y - vmean)
    if (vmean != nullptr) {
        ggml_tensor * sel = ggml_get_rows(ctx, shg, i2);                              // [G, k, T, Hkv]
        ggml_tensor * alpha = ggml_sum_rows(ctx, G > 1 ? swap01(ctx, sel) : ggml_reshape_4d(ctx, sel, k_top, 1, T, Hkv));
        if (sink_hat != nullptr) {
            alpha = ggml_add(ctx, alpha, sink_hat);
        }
        y = ggml_add(ctx, ggml_mul(ctx, ggml_sub(ctx, y, vmean), alpha), vmean);
    }
    y = ggml_cont(ctx, ggml_permute(ctx, y, 0, 1, 3, 2));                            // [Dv, G, Hkv, T]
    return ggml_reshape_2d(ctx, y, Dv*G*Hkv, T);
}

// The fused op's I8 K^T (ggml.h): one position's components share a power-of-two scale, so a new
// position is written without touching its neighbours, and dequantizing is exact in f32.
void ggml_sparq_quantize_kt(const float * x, int64_t d, int8_t * q, size_t stride, int8_t * e) {
    float amax = 0.0f;
    for (int64_t i = 0; i < d; ++i) {
        amax = std::max(amax, std::fabs(x[i]));
    }
    int ex = -126;
    if (amax > 0.0f && std::isfinite(amax)) {
        std::frexp(amax / 127.0f, &ex);  // amax/127 <= 2^ex
        ex = std::clamp(ex, -126, 127);
    }
    const float inv = std::ldexp(1.0f, -ex);
    for (int64_t i = 0; i < d; ++i) {
        q[i*stride] = (int8_t) std::clamp(std::nearbyint(x[i]*inv), -127.0f, 127.0f);
    }
    *e = (int8_t) ex;
}
