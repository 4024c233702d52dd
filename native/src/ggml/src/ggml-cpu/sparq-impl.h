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
#include <cstdint>
#include <cstring>

namespace ggml_sparq {

struct sparq_dims {
    int64_t D, Dv, n_kv, n_batch, n_head, n_head_kv, G, ne3, n_items;
    int     r, k_top, l, flags;
    float   scale;
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
    return d;
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
