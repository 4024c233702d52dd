// sparq-cpp: CPU kernel of GGML_OP_SPARQ_ATTN (SparQ attention, arXiv 2312.04985).
//
// For each query row b of stream s and each KV head g, the G = n_head/n_head_kv query heads of
// the group share one selection:
//   1. i1 = the r components with the largest sum over the group of |q|.
//   2. per head, s_hat = softmax(q[i1] . K^T[i1, :] * scale / sqrt(|q[i1]|_1 / |q|_1) + mask)
//      over the visible positions (reads r rows of K^T, positions contiguous);
//   3. i2 = the last l visible positions plus the top (k - l) of the group's summed s_hat among
//      the others (O(S) radix selection; ties go to the lower position; scores are fp32, and
//      softmax numerators exp(. - max) below FLT_MIN count as 0, so such positions tie);
//   4. alpha = sum of s_hat over i2, per head;
//   5. per head, exact softmax attention over the rows i2 of K and V;
//   6. y = alpha * y_sparse + (1 - alpha) * vmean  (alpha = 1 without GGML_SPARQ_REALLOC).
// When k >= the number of visible positions, every visible row is used and alpha = 1: the
// result is dense attention, and steps 1-4 are skipped.
// Learned attention sinks (src[6], one logit per query head, ggml_sparq_attn_add_sinks): one more
// logit with no value row in the softmaxes of steps 2 and 5, always selected (its s_hat is part
// of alpha), as flash_attn_ext's sinks in dense attention.
// Types: K^T in F16, F32, or I8 with a power-of-two scale per position (step 2 reads it: its
// r rows, and for I8 the exponent row D); K and V in F16, F32 or Q8_0 (steps 5-6 read whole
// rows; Q8_0 rows are dequantized, q stays in f32).
#pragma once

#include "ggml.h"

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;

void   ggml_compute_forward_sparq_attn(const struct ggml_compute_params * params, struct ggml_tensor * dst);

// bytes of scratch the kernel needs with n_tasks threads (used by ggml_graph_plan)
size_t ggml_sparq_attn_work_size(const struct ggml_tensor * node, int n_tasks);

// whether the CPU kernel handles these types and layouts
bool   ggml_sparq_attn_supported(const struct ggml_tensor * op);

#ifdef __cplusplus
}
#endif
