// sparq-cpp: SparQ attention built from standard ggml ops (the "portable graph"), for backends
// without a GGML_OP_SPARQ_ATTN kernel: every op here (top_k, get_rows, mul_mat, soft_max,
// flash_attn_ext, ...) exists on CPU, CUDA, Vulkan and Metal. Same steps and semantics as the
// fused op (docs/sparq.md); what differs is where ties among equal scores go and the float
// rounding. Three stages, as the engines that run sparse decoding on GPUs have them: score (r
// rows of the K^T mirror), select (top_k), attend (flash attention over the k chosen rows, either
// gathered or under a sparse mask that backends with a sparse flash attention read row by row).
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

// [a, b, c, d] -> [b, a, c, d], contiguous
static ggml_tensor * swap01(ggml_context * ctx, ggml_tensor * x) {
    return ggml_cont(ctx, ggml_permute(ctx, x, 1, 0, 2, 3));
}

// x contiguous in the shape [a, b, c, d]: no node where it is already, else a copy
static ggml_tensor * as_4d(ggml_context * ctx, ggml_tensor * x, int64_t a, int64_t b, int64_t c, int64_t d) {
    return ggml_is_contiguous(x) ? ggml_reshape_4d(ctx, x, a, b, c, d) : ggml_cont_4d(ctx, x, a, b, c, d);
}

static ggml_tensor * filled(ggml_context * ctx, ggml_type type, int64_t a, int64_t b, int64_t c, int64_t d, float x) {
    return ggml_fill_inplace(ctx, ggml_new_tensor_4d(ctx, type, a, b, c, d), x);
}

// A stream's ones: one tensor of n ones, filled on the first request (so in the graph only where
// something reads it), viewed contiguously as [1, b, c, d] by every sum and indicator that needs ones
struct ones_src {
    ggml_context * ctx;
    int64_t n;
    ggml_tensor * t = nullptr;

    ggml_tensor * view(int64_t b, int64_t c, int64_t d) {
        GGML_ASSERT(b*c*d <= n);
        if (t == nullptr) {
            t = filled(ctx, GGML_TYPE_F32, n, 1, 1, 1, 1.0f);
        }
        const size_t e = ggml_element_size(t);
        return ggml_view_4d(ctx, t, 1, b, c, d, e, e*b, e*b*c, 0);
    }
};

// x [a, b, c, d] summed over its dimension 1: [a, 1, c, d]; by out_prod with the stream's ones
// where given, else by a transposed copy and sum_rows
static ggml_tensor * sum1(ggml_context * ctx, ggml_tensor * x, ones_src * ones) {
    const int64_t a = x->ne[0], b = x->ne[1], c = x->ne[2], d = x->ne[3];
    if (a == 1) {
        return ggml_sum_rows(ctx, as_4d(ctx, x, b, 1, c, d));
    }
    if (ones != nullptr) {
        return ggml_out_prod(ctx, x, ones->view(b, c, d));
    }
    return ggml_reshape_4d(ctx, ggml_sum_rows(ctx, swap01(ctx, x)), a, 1, c, d);
}

// One stream of ggml_sparq_attn_ops. Layouts: q [D, T, G, Hkv] (a view), k [D, n_kv, Hkv],
// kt [n_kv, D, Hkv], v [Dv, n_kv, Hkv], vmean [Dv, 1, T, Hkv] (a view), mask [n_kv, T] F16,
// bias [n_kv, T] F32. Returns [Dv, G*Hkv, T].
static ggml_tensor * sparq_stream(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * kt,
                                  ggml_tensor * v, ggml_tensor * vmean, ggml_tensor * mask, ggml_tensor * bias,
                                  ggml_tensor * sinks, float scale, int32_t r, int32_t k_top, int32_t flags) {
    const int64_t D = q->ne[0], T = q->ne[1], G = q->ne[2], Hkv = q->ne[3];
    const int64_t n_kv = kt->ne[0], Dv = v->ne[0];
    // sums over a dimension other than the first, and step 2's product over the r components,
    // by out_prod where the backend has it (no transposed copies), else by mul_mat
    const bool op = !(flags & GGML_SPARQ_MUL_MAT);
    // the ones those sums and the chosen cells' indicator (mix) read: one fill for all of them
    ones_src ones = { ctx, std::max({ (int64_t) r, D, G, (int64_t) k_top })*T*Hkv };
    ones_src * sum_ones = op ? &ones : nullptr;

    // score. i1: the top r components of the group's summed |q|; s_hat from r rows of the mirror
    ggml_tensor * qg = G == 1 && T == 1 ? as_4d(ctx, q, 1, D, 1, Hkv)
                                        : ggml_cont(ctx, ggml_permute(ctx, q, 1, 2, 0, 3)); // [G, D, T, Hkv]
    ggml_tensor * aq = ggml_abs(ctx, qg);
    ggml_tensor * qa = G > 1 ? ggml_sum_rows(ctx, aq) : aq;                          // [1, D, T, Hkv]
    ggml_tensor * i1 = ggml_top_k(ctx, ggml_reshape_2d(ctx, qa, D, T*Hkv), r);       // [r, T*Hkv]
    ggml_tensor * kr = ggml_get_rows(ctx, kt, ggml_reshape_2d(ctx, i1, (int64_t) r*T, Hkv));
    kr = ggml_reshape_4d(ctx, kr, n_kv, r, T, Hkv);
    ggml_tensor * qs = ggml_get_rows(ctx, qg, ggml_reshape_3d(ctx, i1, r, T, Hkv));  // [G, r, T, Hkv]
    if (!(flags & GGML_SPARQ_NO_TAU)) {
        // tau folded into q[i1]: divided by sqrt(|q[i1]|_1 / |q|_1) per head (the tiny term
        // keeps a head whose chosen components are all 0 at 0, never NaN)
        ggml_tensor * l1s = ggml_scale_bias(ctx, sum1(ctx, ggml_abs(ctx, qs), sum_ones), 1.0f, 1e-30f); // [G, 1, T, Hkv]
        qs = ggml_div(ctx, qs, ggml_sqrt(ctx, ggml_div(ctx, l1s, sum1(ctx, aq, sum_ones))));
    }
    ggml_tensor * sh = op ? ggml_out_prod(ctx, kr, qs)                                // [n_kv, G, T, Hkv]
                          : ggml_mul_mat(ctx, swap01(ctx, kr), G > 1 ? swap01(ctx, qs) : ggml_reshape_4d(ctx, qs, r, 1, T, Hkv));
    // softmax per head over the cells: ggml's mask rows are dimension 1 and its sinks' heads
    // dimension 2, so [n_kv, T, H] (no copy for one query)
    const bool perm = T > 1 && G > 1;
    if (perm) {
        sh = ggml_cont(ctx, ggml_permute(ctx, sh, 0, 2, 1, 3));                      // [n_kv, T, G, Hkv]
    }
    sh = ggml_soft_max_ext(ctx, ggml_reshape_3d(ctx, sh, n_kv, T, G*Hkv), mask, scale, 0.0f);
    ggml_soft_max_add_sinks(sh, sinks);
    sh = ggml_reshape_4d(ctx, sh, n_kv, T, G, Hkv);
    if (perm) {
        sh = ggml_cont(ctx, ggml_permute(ctx, sh, 0, 2, 1, 3));
    }
    sh = ggml_reshape_4d(ctx, sh, n_kv, G, T, Hkv);                                  // s_hat

    // select. i2: the top k of the group's summed s_hat, the local window forced in by the bias
    ggml_tensor * gs = G > 1 ? sum1(ctx, sh, sum_ones) : sh;                          // [n_kv, 1, T, Hkv]
    gs = ggml_add(ctx, ggml_reshape_3d(ctx, gs, n_kv, T, Hkv), bias);
    ggml_tensor * i2 = ggml_top_k(ctx, gs, k_top);                                    // [k, T, Hkv]

    // attend: flash attention over the k chosen rows of each KV head, the heads of a group as
    // its query heads and the KV heads as ggml's streams (one mask for all heads of a stream)
    ggml_tensor * y = nullptr;                                                        // [Dv, G, T, Hkv]
    if ((flags & GGML_SPARQ_GATHER) && (sinks == nullptr || T*Hkv == 1)) {  // ggml's sinks: per head of a stream
        // the chosen rows gathered, a stream per KV head and query
        ggml_tensor * i2r = ggml_reshape_2d(ctx, i2, (int64_t) k_top*T, Hkv);
        ggml_tensor * ks = ggml_reshape_4d(ctx, ggml_get_rows(ctx, k, i2r), D,  k_top, 1, T*Hkv);
        ggml_tensor * vs = ggml_reshape_4d(ctx, ggml_get_rows(ctx, v, i2r), Dv, k_top, 1, T*Hkv);
        ggml_tensor * qf = T == 1 ? as_4d(ctx, q, D, 1, G, Hkv)
                                  : ggml_reshape_4d(ctx, ggml_cont(ctx, ggml_permute(ctx, q, 0, 2, 1, 3)), D, 1, G, T*Hkv);
        ggml_tensor * ms = nullptr;
        if (!(flags & GGML_SPARQ_ALL_SEE_K)) {
            // a query that sees fewer than k cells gathered hidden ones: mask them
            ms = ggml_get_rows(ctx, ggml_reshape_4d(ctx, gs, 1, n_kv, T, Hkv), i2);  // [1, k, T, Hkv]
            ms = ggml_scale(ctx, ggml_clamp(ctx, ms, -1.0f, 0.0f), GGML_SPARQ_WINDOW_BONUS);
            ms = ggml_cast(ctx, ggml_reshape_4d(ctx, ms, k_top, 1, 1, T*Hkv), GGML_TYPE_F16);
        }
        ggml_tensor * fa = ggml_flash_attn_ext(ctx, qf, ks, vs, ms, scale, 0.0f, 0.0f);
        ggml_prec_set_acc(fa, GGML_PREC_F32);
        ggml_flash_attn_ext_add_sinks(fa, sinks);
        y = ggml_reshape_4d(ctx, fa, Dv, G, T, Hkv);
    } else {
        // the whole cache under a mask whose finite cells are the chosen rows (backends with a
        // sparse flash attention read only those)
        ggml_tensor * m = ggml_fill_inplace(ctx, ggml_new_tensor_4d(ctx, GGML_TYPE_F16, 1, n_kv, T, Hkv), -INFINITY);
        ggml_tensor * z = ggml_fill_inplace(ctx, ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 1, k_top, T, Hkv), 0.0f);
        m = ggml_reshape_4d(ctx, ggml_set_rows(ctx, m, z, i2), n_kv, T, 1, Hkv);
        if (!(flags & GGML_SPARQ_ALL_SEE_K)) {
            m = ggml_add(ctx, m, mask);                                               // a chosen cell it cannot see
        }
        ggml_tensor * kh = ggml_view_4d(ctx, k, D,  n_kv, 1, Hkv, k->nb[1], k->nb[2], k->nb[2], 0);
        ggml_tensor * vh = ggml_view_4d(ctx, v, Dv, n_kv, 1, Hkv, v->nb[1], v->nb[2], v->nb[2], 0);
        if (sinks == nullptr || Hkv == 1) {
            y = ggml_flash_attn_ext(ctx, q, kh, vh, m, scale, 0.0f, 0.0f);
            ggml_prec_set_acc(y, GGML_PREC_F32);
            ggml_flash_attn_ext_set_n_kv_max(y, k_top);
            ggml_flash_attn_ext_add_sinks(y, sinks);
        } else {
            // ggml's sinks are per head of a stream: one flash attention per KV head
            for (int64_t h = 0; h < Hkv; ++h) {
                ggml_tensor * fa = ggml_flash_attn_ext(ctx,
                    ggml_view_4d(ctx, q,  D,    T, G, 1, q->nb[1],  q->nb[2],  q->nb[3],  h*q->nb[3]),
                    ggml_view_4d(ctx, kh, D, n_kv, 1, 1, kh->nb[1], kh->nb[2], kh->nb[3], h*kh->nb[3]),
                    ggml_view_4d(ctx, vh, Dv, n_kv, 1, 1, vh->nb[1], vh->nb[2], vh->nb[3], h*vh->nb[3]),
                    ggml_view_4d(ctx, m,  n_kv, T, 1, 1, m->nb[1],  m->nb[2],  m->nb[3],  h*m->nb[3]),
                    scale, 0.0f, 0.0f);
                ggml_prec_set_acc(fa, GGML_PREC_F32);
                ggml_flash_attn_ext_set_n_kv_max(fa, k_top);
                ggml_flash_attn_ext_add_sinks(fa, ggml_view_1d(ctx, sinks, G, h*G*sinks->nb[0]));
                y = y == nullptr ? fa : ggml_concat(ctx, y, fa, 3);
            }
        }
    }

    // mix: alpha = s_hat summed over the chosen rows (and the sink, always chosen), per head;
    // y = vmean + alpha (y - vmean)
    if (vmean != nullptr) {
        ggml_tensor * alpha;                                                          // [1, G, T, Hkv]
        if (G > 1) {
            // the chosen cells' indicator times s_hat
            ggml_tensor * ind = filled(ctx, GGML_TYPE_F32, 1, n_kv, T, Hkv, 0.0f);
            ind = ggml_set_rows(ctx, ind, ones.view(k_top, T, Hkv), i2);
            alpha = ggml_mul_mat(ctx, ggml_reshape_4d(ctx, ind, n_kv, 1, T, Hkv), sh);
        } else {
            alpha = ggml_get_rows(ctx, ggml_reshape_4d(ctx, sh, 1, n_kv, T, Hkv), i2);
            alpha = ggml_sum_rows(ctx, ggml_reshape_4d(ctx, alpha, k_top, 1, T, Hkv));
        }
        if (sinks != nullptr) {
            // the sink's s_hat: 1 - the cells' sum
            alpha = ggml_scale_bias(ctx, ggml_sub(ctx, alpha, ggml_sum_rows(ctx, sh)), 1.0f, 1.0f);
        }
        y = ggml_add(ctx, ggml_mul(ctx, ggml_sub(ctx, y, vmean), alpha), vmean);
    }
    return T == 1 ? ggml_reshape_3d(ctx, y, Dv, G*Hkv, 1)
                  : ggml_reshape_3d(ctx, ggml_cont(ctx, ggml_permute(ctx, y, 0, 1, 3, 2)), Dv, G*Hkv, T);
}

struct ggml_tensor * ggml_sparq_attn_ops(
        struct ggml_context * ctx,
        struct ggml_tensor  * q,
        struct ggml_tensor  * k,
        struct ggml_tensor  * kt,
        struct ggml_tensor  * v,
        struct ggml_tensor  * vmean,
        struct ggml_tensor  * mask,
        struct ggml_tensor  * bias,
        struct ggml_tensor  * sinks,
        float                 scale,
        int32_t               r,
        int32_t               k_top,
        int32_t               flags) {
    const int64_t D = q->ne[0], T = q->ne[1], H = q->ne[2], ns = q->ne[3];
    const int64_t n_kv = k->ne[1], Hkv = k->ne[2], Dv = v->ne[0], G = H/Hkv;
    GGML_ASSERT(q->type == GGML_TYPE_F32 && H % Hkv == 0 && k->ne[0] == D && k->ne[3] == ns);
    GGML_ASSERT((kt->type == GGML_TYPE_F16 || kt->type == GGML_TYPE_F32) && kt->ne[0] == n_kv && kt->ne[1] >= D && kt->ne[2] == Hkv && kt->ne[3] == ns);
    GGML_ASSERT(v->ne[1] == n_kv && v->ne[2] == Hkv && v->ne[3] == ns);
    GGML_ASSERT(mask->type == GGML_TYPE_F16 && mask->ne[0] == n_kv && mask->ne[1] == T && mask->ne[2] == 1 && mask->ne[3] == ns);
    GGML_ASSERT(bias->type == GGML_TYPE_F32 && ggml_are_same_shape(bias, mask) && ggml_is_contiguous(bias));
    GGML_ASSERT(r >= 1 && r <= D && k_top >= 1 && k_top <= n_kv);
    GGML_ASSERT((vmean != nullptr) == ((flags & GGML_SPARQ_REALLOC) != 0));
    GGML_ASSERT(vmean == nullptr || (vmean->type == GGML_TYPE_F32 && vmean->ne[0] == Dv && vmean->ne[1] == Hkv && vmean->ne[2] == T && vmean->ne[3] == ns));
    GGML_ASSERT(sinks == nullptr || (sinks->type == GGML_TYPE_F32 && ggml_nelements(sinks) == H && ggml_is_contiguous(sinks)));

    ggml_tensor * out = nullptr;
    for (int64_t s = 0; s < ns; ++s) {
        ggml_tensor * qs = ggml_view_4d(ctx, q, D, T, G, Hkv, q->nb[1], q->nb[2], G*q->nb[2], s*q->nb[3]);
        ggml_tensor * ks = ggml_view_3d(ctx, k, D, n_kv, Hkv, k->nb[1], k->nb[2], s*k->nb[3]);
        ggml_tensor * kts = ggml_view_3d(ctx, kt, n_kv, D, Hkv, kt->nb[1], kt->nb[2], s*kt->nb[3]);
        ggml_tensor * vs = ggml_view_3d(ctx, v, Dv, n_kv, Hkv, v->nb[1], v->nb[2], s*v->nb[3]);
        // (one stream: the mask itself; a view of it would be one more copy of a host input per
        // layer for the scheduler to make)
        ggml_tensor * ms = ns == 1 ? mask : ggml_view_2d(ctx, mask, n_kv, T, mask->nb[1], s*mask->nb[3]);
        ggml_tensor * bs = ggml_view_2d(ctx, bias, n_kv, T, bias->nb[1], s*bias->nb[3]);
        ggml_tensor * vm = nullptr;
        if (vmean != nullptr) {
            vm = ggml_view_4d(ctx, vmean, Dv, 1, T, Hkv, vmean->nb[1], vmean->nb[2], vmean->nb[1], s*vmean->nb[3]);
        }
        ggml_tensor * y = sparq_stream(ctx, qs, ks, kts, vs, vm, ms, bs, sinks, scale, r, k_top, flags);
        out = out == nullptr ? y : ggml_concat(ctx, out, y, 3);
    }
    return out;
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

void ggml_sparq_quantize_kt_heads(const float * x, size_t x_head_stride, int64_t d, int64_t n_head, int8_t * kt, size_t n_cells) {
    for (int64_t h = 0; h < n_head; ++h) {
        int8_t * col = kt + (size_t) h*(d + 1)*n_cells;
        ggml_sparq_quantize_kt(x + h*x_head_stride, d, col, n_cells, col + (size_t) d*n_cells);
    }
}
