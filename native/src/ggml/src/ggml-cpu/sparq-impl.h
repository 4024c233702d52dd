// sparq-cpp: what the CPU kernel's files share (sparq.cpp: the fast path, sparq-ref.cpp: the
// reference path): the op's dimensions and the mask helpers.
#pragma once

#include "sparq.h"

#define GGML_COMMON_DECL_CPP
#include "ggml-common.h"
#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace ggml_sparq {

struct sparq_dims {
    int64_t D, Dv, n_kv, n_batch, n_head, n_head_kv, G, ne3, n_items;
    int     r, k_top, l, flags;
    float   scale;
    float   k_frac;   // > 0: each query's k from its own visible count (ggml_sparq_attn_set_budget)
    int     l_div;    // with k_frac: > 0, each query's window is its k / l_div; 0: l (at most its k)
    int     min_vis;  // a query with fewer visible positions attends to all of them
};

inline sparq_dims get_dims(const ggml_tensor * dst) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    sparq_dims d;
    d.D         = q->ne[0];
    d.Dv        = v->ne[0];
    d.n_kv      = k->ne[1];
    d.n_batch   = q->ne[1];
    d.n_head    = q->ne[2];
    d.n_head_kv = k->ne[2];
    d.G         = d.n_head / d.n_head_kv;
    d.ne3       = q->ne[3];
    d.n_items   = d.ne3 * d.n_batch * d.n_head_kv;
    d.scale     = ggml_get_op_params_f32(dst, 0);
    d.r         = std::min<int>(ggml_get_op_params_i32(dst, 1), (int) d.D);
    d.k_top     = ggml_get_op_params_i32(dst, 2);
    d.l         = std::min(ggml_get_op_params_i32(dst, 4), d.k_top);
    d.flags     = ggml_get_op_params_i32(dst, 5);
    d.k_frac    = ggml_get_op_params_f32(dst, 6);  // 0 unless set: k_top and l for every query
    d.l_div     = ggml_get_op_params_i32(dst, 7);
    d.min_vis   = ggml_get_op_params_i32(dst, 8);
    return d;
}

// The selection size k and local window l of a query with n_vis visible positions: k_top and l,
// or with a budget per query round(k_frac*n_vis) in 1..k_top and a window of k/l_div (l_div > 0)
// or of l (at most k); every visible position (k = n_vis) below min_vis. The query is dense
// when k >= n_vis.
inline void query_budget(const sparq_dims & d, int64_t n_vis, int32_t & k, int32_t & l) {
    if (n_vis < d.min_vis) {
        k = (int32_t) n_vis;
        l = 0;
    } else if (d.k_frac > 0.0f) {
        k = (int32_t) std::clamp<int64_t>(std::lround((double) d.k_frac*n_vis), 1, d.k_top);
        l = d.l_div > 0 ? k/d.l_div : std::min(d.l, k);
    } else {
        k = d.k_top;
        l = d.l;
    }
}

inline float mask_at(const ggml_tensor * mask, const char * row, int64_t i) {
    return mask->type == GGML_TYPE_F16 ? GGML_CPU_FP16_TO_FP32(((const ggml_fp16_t *) row)[i])
                                       : ((const float *) row)[i];
}

// -INF test on the raw bits (f16 0xFC00, f32 0xFF800000): no conversion in the scans
inline bool masked_at(const ggml_tensor * mask, const char * row, int64_t i) {
    if (mask->type == GGML_TYPE_F16) {
        return ((const uint16_t *) row)[i] == 0xFC00;
    }
    uint32_t u; memcpy(&u, (const float *) row + i, 4);
    return u == 0xFF800000u;
}

inline const char * mask_row(const ggml_tensor * mask, int64_t b, int64_t s) {
    return (const char *) mask->data + b*mask->nb[1] + (s % mask->ne[3])*mask->nb[3];
}

// the reference path (sparq-ref.cpp): plain, double precision, one thread
void attn_ref(const ggml_tensor * dst);

} // namespace ggml_sparq
