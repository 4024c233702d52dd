// sparq-cpp: CPU kernel of GGML_OP_SPARQ_ATTN. Semantics: sparq.h.
//
// Fast path, all threads, one member function of sparq_run per phase, a barrier after each;
// numbered by the steps of sparq.h (docs/sparq.md):
//   scan_items        step 1, per item (query row x KV head): visible count and range, local
//                     window, i1, tau; items with k >= visible take every visible row (dense)
//                     and skip steps 2-3
//   approx_logits     step 2, positions split across threads: approximate logits from r rows of
//                     K^T (AVX-512, AVX2 or NEON: in registers, f16 or int8 converted on the fly), per-thread max per head
//   approx_scores     step 2, positions split: s_hat's numerators exp(L - max) in place of the
//                     logits (the only exponentials of steps 2-4), per-thread denominators; one
//                     head per group: the group's scores and their histogram
//   group_scores      step 3 (G > 1), positions split: the group's summed, normalised score;
//                     +inf on the local window; per-thread histograms
//   select_positions  step 3, per item: O(S) radix selection of the top k, in position order
//   attend_selected   steps 4-5, selected rows split across threads: exact attention on K/V
//                     rows, softmax partials per thread (max, sum, weighted V, alpha's share)
//   merge_and_mix     step 6, per item and head: merge the partials, alpha mix with the mean of V
// The reference path (params->use_ref) is sparq-ref.cpp; the inner loops, with their SIMD paths,
// sparq-vec.h. This file is over 500 lines because the phases share one struct of dimensions
// and scratch pointers: kept together, the order of the phases and what each leaves for the
// next read in one place.

#include "sparq-impl.h"
#include "sparq-vec.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

using namespace ggml_sparq;

namespace {

constexpr int64_t SPARQ_BLK   = 256;  // positions per block in step 2
constexpr int64_t SPARQ_PF    = 8;    // rows prefetched ahead in the gather of step 5

inline void prefetch_row(const char * p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) {
        __builtin_prefetch(p + o, 0, 3);
    }
}


// what step 1 (scan_items) leaves for the others, per item
struct item_info {
    int32_t n_vis;    // visible positions
    int32_t dense;    // every visible row is selected, alpha = 1
    int32_t p_lo;     // first visible position
    int32_t p_hi;     // one past the last visible position
    int32_t t_local;  // visible positions >= t_local form the local window
    int32_t n_sel;    // selected positions (written by step 1 for dense items, by step 3 otherwise)
    int32_t k;        // positions to select (query_budget)
    int32_t l;        // of them, the local window
};

size_t align16(size_t n) { return (n + 15) & ~size_t(15); }

// a thread's partial result for one (item, head) of steps 4-5, part_stride words: its rows' logit
// max, softmax denominator against that max, alpha's share, then the weighted sum of V [Dv]
enum sparq_part { PART_MAX = 0, PART_SUM = 1, PART_ALPHA = 2, PART_ACC = 3 };

// scratch layout, in 4-byte words; one definition serves the planner and the kernel
struct sparq_layout {
    size_t info, i1, ascale, sel, L, gs, pmax, psum, hist, part, thr, per_thr, total;
    int    hbits;       // bits of the selection's histogram (fewer for short contexts)
    size_t part_stride; // per (thread, item, head): M, S, alpha, acc[Dv]
};

sparq_layout get_layout(const sparq_dims & d, int nth) {
    sparq_layout o;
    const size_t I = d.n_items, G = d.G, S = d.n_kv;
    size_t off = 0;
    auto take = [&](size_t words) { size_t at = off; off += align16(words); return at; };
    o.info        = take(I * sizeof(item_info) / 4);
    o.i1          = take(I * d.D);
    o.ascale      = take(I * G);
    o.sel         = take(I * S);
    o.L           = take(I * G * S);
    o.gs          = take(I * S);
    o.pmax        = take((size_t) nth * I * G);
    o.psum        = take((size_t) nth * I * G);
    o.hbits       = 8;
    while (o.hbits < SPARQ_HBITS && (int64_t(1) << (o.hbits + 3)) < d.n_kv) o.hbits++;
    o.hist        = take((size_t) nth * I << o.hbits);  // per thread and item: its positions' histogram
    o.part_stride = PART_ACC + d.Dv;
    o.part        = take((size_t) nth * I * G * o.part_stride);
    // per thread: step-2 row block + G accumulators + mask block, q rows in f32, V row in f32,
    // the candidate list of the selection, the step-5 scores
    o.per_thr     = align16(SPARQ_BLK * (G + 2) + G * d.D + d.Dv + S + G * (S / nth + 32));
    o.thr         = take((size_t) nth * o.per_thr);
    o.total       = off;
    return o;
}


// One run of the fast path on one thread: the op's tensors, dimensions and scratch, and one
// member function per phase. Every thread builds its own; the phases run in this order, with a
// barrier after each (sparq_attn_fast), and share their results through the scratch (wdata).
struct sparq_run {
    const ggml_tensor * q, * k, * v, * mask, * kt, * vmean;
    const float * sinks;  // learned attention sinks, one logit per query head, or null
    ggml_tensor * dst;
    const sparq_dims d;
    const int ith, nth;
    const sparq_layout o;
    const int64_t G, S, I;  // heads per group, positions, items (query row x KV head)
    const bool realloc, no_tau, kt_f16, kt_i8, k_f16, v_f16, k_q8, v_q8;

    // shared scratch, per item (and head, and thread where it says)
    item_info * info;   // step 1: visible range, local window, selection size
    int32_t * i1;       // step 1: the r components, in order [D per item]
    float * ascale;     // step 1: the approximate scores' scale (tau) [G per item]
    int32_t * sel;      // step 3: the selected positions, in order [S per item]
    float * Lall;       // step 2: logits, then s_hat's numerators [G*S per item]
    float * gsall;      // step 3: the group's summed scores (-1 masked, +inf window) [S per item]
    float * pmax;       // step 2: per thread, the logits' max [nth*I*G]
    float * psum;       // step 2: per thread, the softmax denominators' partials [nth*I*G]
    int32_t * hists;    // step 3: per thread, the histogram of its scores [nth*I << hbits]
    float * part;       // steps 4-5: per thread, M, S, alpha's share, weighted V [nth*I*G*part_stride]

    // this thread's scratch
    float * blk_row;    // SPARQ_BLK: a K^T row piece in f32, or a K row
    float * blk_mask;   // SPARQ_BLK: a mask piece in f32
    float * acc;        // G*SPARQ_BLK: step 2's accumulators; step 1's summed |q|
    float * qbuf;       // G*D: the group's q rows in f32; step 2's query values
    float * vrow;       // Dv: a V row in f32
    uint32_t * cand;    // S: the selection's candidates; step 5's rows
    float * sc;         // G*(S/nth + 32): step 5's scores (two pieces of at most n/nth + 16 rows)

    sparq_run(const ggml_compute_params * params, ggml_tensor * t)
        : q(t->src[0]), k(t->src[1]), v(t->src[2]), mask(t->src[3]), kt(t->src[4]), vmean(t->src[5]),
          sinks(t->src[6] ? (const float *) t->src[6]->data : nullptr), dst(t),
          d(get_dims(t)), ith(params->ith), nth(params->nth), o(get_layout(d, nth)),
          G(d.G), S(d.n_kv), I(d.n_items),
          realloc(d.flags & GGML_SPARQ_REALLOC), no_tau(d.flags & GGML_SPARQ_NO_TAU),
          kt_f16(kt->type == GGML_TYPE_F16), kt_i8(kt->type == GGML_TYPE_I8), k_f16(k->type == GGML_TYPE_F16), v_f16(v->type == GGML_TYPE_F16),
          k_q8(k->type == GGML_TYPE_Q8_0), v_q8(v->type == GGML_TYPE_Q8_0) {
        GGML_ASSERT(params->wsize >= o.total * 4);
        GGML_ASSERT(G <= GGML_SPARQ_MAX_GROUP && d.D <= GGML_SPARQ_MAX_HEAD_SIZE);
        float * W = (float *) params->wdata;
        info   = (item_info *) (W + o.info);
        i1     = (int32_t *) (W + o.i1);
        ascale = W + o.ascale;
        sel    = (int32_t *) (W + o.sel);
        Lall   = W + o.L;
        gsall  = W + o.gs;
        pmax   = W + o.pmax;
        psum   = W + o.psum;
        hists  = (int32_t *) (W + o.hist);
        part   = W + o.part;
        float * thr = W + o.thr + (size_t) ith * o.per_thr;
        blk_row  = thr;
        blk_mask = thr + SPARQ_BLK;
        acc      = thr + 2*SPARQ_BLK;
        qbuf     = thr + (G + 2)*SPARQ_BLK;
        vrow     = qbuf + G*d.D;
        cand     = (uint32_t *) (vrow + d.Dv);
        sc       = (float *) (cand + S);
    }

    void item_coords(int64_t it, int64_t & s, int64_t & b, int64_t & g) const {
        g = it % d.n_head_kv; b = (it / d.n_head_kv) % d.n_batch; s = it / (d.n_head_kv * d.n_batch);
    }
    const float * q_row(int64_t b, int64_t h, int64_t s) const {
        return (const float *) ((const char *) q->data + b*q->nb[1] + h*q->nb[2] + s*q->nb[3]);
    }

    // the sink logit of head hh of item it's group (-inf: none)
    float sink(int64_t it, int64_t hh) const {
        return sinks ? sinks[(it % d.n_head_kv)*G + hh] : -INFINITY;
    }

    // per head of item it: the global max of the approximate logits and the sink (after step 2's
    // logits), and the inverse softmax denominator with the sink's term (after step 2's softmax),
    // from the threads' partials; sink_hat (if given): the sink's own s_hat
    void head_max(int64_t it, float * M) const {
        for (int64_t hh = 0; hh < G; ++hh) {
            float m = sink(it, hh);
            for (int t = 0; t < nth; ++t) m = std::max(m, pmax[((size_t) t*I + it)*G + hh]);
            M[hh] = m;
        }
    }
    void head_zinv(int64_t it, float * zinv, float * sink_hat = nullptr) const {
        float M[GGML_SPARQ_MAX_GROUP];
        if (sinks) head_max(it, M);
        for (int64_t hh = 0; hh < G; ++hh) {
            double z = 0;
            for (int t = 0; t < nth; ++t) z += psum[((size_t) t*I + it)*G + hh];
            const double zs = sinks && sink(it, hh) > -INFINITY ? std::exp((double) sink(it, hh) - M[hh]) : 0.0;
            z += zs;
            zinv[hh] = z > 0 ? (float) (1.0 / z) : 0.0f;
            if (sink_hat) sink_hat[hh] = z > 0 ? (float) (zs / z) : 0.0f;
        }
    }

    // Step 1, one item per thread: the visible positions (count and range) and the local window;
    // i1, the top-r components of the group's summed |q|; tau per head. An item with k >= its
    // visible count takes every visible row (dense) and skips steps 2-3.
    void scan_items() {
        for (int64_t it = ith; it < I; it += nth) {
            int64_t s, b, g; item_coords(it, s, b, g);
            const char * mrow = mask_row(mask, b, s);
            item_info & inf = info[it];
            int32_t n_vis, p_lo, p_hi;
            scan_visible(mask, mrow, S, n_vis, p_lo, p_hi);
            inf.n_vis = n_vis; inf.p_lo = p_lo; inf.p_hi = p_hi;
            query_budget(d, n_vis, inf.k, inf.l);
            inf.dense = n_vis <= inf.k;
            int32_t * isel = sel + it*S;
            if (inf.dense) {
                int32_t n = 0;
                for (int64_t p = p_lo; p < p_hi; ++p) {
                    if (!masked_at(mask, mrow, p)) isel[n++] = (int32_t) p;
                }
                inf.n_sel = n;
                continue;
            }
            // local window: the last l visible positions
            int32_t t_local = p_hi, seen = 0;
            for (int64_t p = p_hi - 1; p >= p_lo && seen < inf.l; --p) {
                if (!masked_at(mask, mrow, p)) { t_local = (int32_t) p; seen++; }
            }
            inf.t_local = t_local;
            // i1: top-r components of the group's summed |q|, ties to the lower index
            float * a = acc;  // D floats of per-thread scratch, free in step 1
            std::fill(a, a + d.D, 0.0f);
            for (int64_t hh = 0; hh < G; ++hh) {
                const float * qh = q_row(b, g*G + hh, s);
                for (int64_t j = 0; j < d.D; ++j) a[j] += std::fabs(qh[j]);
            }
            int32_t * ii = i1 + it*d.D;
            std::iota(ii, ii + d.D, 0);
            if (d.r < d.D) {
                std::partial_sort(ii, ii + d.r, ii + d.D, [&](int32_t x, int32_t y) {
                    return a[x] > a[y] || (a[x] == a[y] && x < y);
                });
                std::sort(ii, ii + d.r);
            }
            // tau: scale / sqrt(|q[i1]|_1 / |q|_1), per head
            for (int64_t hh = 0; hh < G; ++hh) {
                const float * qh = q_row(b, g*G + hh, s);
                float l1 = 0, l1s = 0;
                for (int64_t j = 0; j < d.D; ++j) l1 += std::fabs(qh[j]);
                for (int32_t j = 0; j < d.r; ++j) l1s += std::fabs(qh[ii[j]]);
                const float ratio = l1 > 0 && l1s > 0 ? l1s / l1 : 1.0f;
                ascale[it*G + hh] = no_tau ? d.scale : d.scale / std::sqrt(ratio);
            }
        }
    }

    // Step 2, logits: positions split across threads; from r rows of K^T (AVX-512, AVX2 or NEON: accumulators in
    // registers, f16 converted on the fly), scaled by tau and masked; their max per head.
    void approx_logits() {
        for (int64_t it = 0; it < I; ++it) {
            const item_info & inf = info[it];
            if (inf.dense) continue;
            int64_t s, b, g; item_coords(it, s, b, g);
            int64_t c0, c1; split_range(inf.p_lo, inf.p_hi, ith, nth, c0, c1);
            const char * mrow = mask_row(mask, b, s);
            const int32_t * ii = i1 + it*d.D;
            float * L = Lall + it*G*S;
            float * gs = gsall + it*S;
            float lmax[GGML_SPARQ_MAX_GROUP];
            for (int64_t hh = 0; hh < G; ++hh) lmax[hh] = -INFINITY;
            const char * kt0 = (const char *) kt->data + g*kt->nb[2] + s*kt->nb[3];
            const int8_t * ex = kt_i8 ? (const int8_t *) (kt0 + d.D*kt->nb[1]) : nullptr;  // I8: row D, the exponents
            // plain step 2 on [pa, pb) (at most SPARQ_BLK positions)
            auto step2_plain = [&](int64_t pa, int64_t pb) {
                const int64_t n = pb - pa;
                if (n <= 0) return;
                memset(acc, 0, sizeof(float)*G*SPARQ_BLK);
                for (int32_t jj = 0; jj < d.r; ++jj) {
                    const int64_t j = ii[jj];
                    const char * ktrow = kt0 + j*kt->nb[1] + pa*kt->nb[0];
                    const float * row;
                    if (kt_f16) {
                        ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) ktrow, blk_row, n);
                        row = blk_row;
                    } else if (kt_i8) {
                        for (int64_t i = 0; i < n; ++i) blk_row[i] = (float) ((const int8_t *) ktrow)[i];
                        row = blk_row;
                    } else {
                        row = (const float *) ktrow;
                    }
                    for (int64_t hh = 0; hh < G; ++hh) {
                        ggml_vec_mad_f32((int) n, acc + hh*SPARQ_BLK, row, q_row(b, g*G + hh, s)[j]);
                    }
                }
                if (mask->type == GGML_TYPE_F16) {
                    ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) mrow + pa, blk_mask, n);
                } else {
                    memcpy(blk_mask, (const float *) mrow + pa, n*sizeof(float));
                }
                for (int64_t i = 0; i < n; ++i) gs[pa + i] = blk_mask[i] == -INFINITY ? -1.0f : 0.0f;
                if (kt_i8) {
                    for (int64_t hh = 0; hh < G; ++hh) {
                        for (int64_t i = 0; i < n; ++i) acc[hh*SPARQ_BLK + i] = std::ldexp(acc[hh*SPARQ_BLK + i], ex[pa + i]);
                    }
                }
                for (int64_t hh = 0; hh < G; ++hh) {
                    const float sc = ascale[it*G + hh];
                    float * Lh = L + hh*S + pa;
                    const float * ah = acc + hh*SPARQ_BLK;
                    float mx = lmax[hh];
                    for (int64_t i = 0; i < n; ++i) {
                        // masked positions: -inf, whatever K^T holds there
                        const float x = blk_mask[i] == -INFINITY ? -INFINITY : ah[i]*sc + blk_mask[i];
                        Lh[i] = x;
                        mx = std::max(mx, x);
                    }
                    lmax[hh] = mx;
                }
            };
            int64_t n8 = 0;
#if defined(SPARQ_SIMD)
            if (kt_f16 || kt_i8) {
                n8 = (c1 - c0) & ~int64_t(7);
                const void * rows[GGML_SPARQ_MAX_HEAD_SIZE];  // r <= D (supports_op)
                for (int32_t jj = 0; jj < d.r; ++jj) rows[jj] = kt0 + ii[jj]*kt->nb[1];
                // the query values each row multiplies, per group of up to 4 heads: qs[h0*r + jj*ng + h]
                float * qs = qbuf;  // G*D floats, free until attend_selected
                for (int64_t h0 = 0; h0 < G; h0 += 4) {
                    const int64_t ng = std::min<int64_t>(4, G - h0);
                    for (int64_t h = 0; h < ng; ++h) {
                        const float * qh = q_row(b, g*G + h0 + h, s);
                        for (int32_t jj = 0; jj < d.r; ++jj) qs[h0*d.r + jj*ng + h] = qh[ii[jj]];
                    }
                }
                // blocks of SPARQ_BLK positions: a block's K^T rows stay in L1 across the head groups
                for (int64_t p0 = c0; p0 < c0 + n8; p0 += SPARQ_BLK) {
                    const int64_t n = std::min(SPARQ_BLK, c0 + n8 - p0);
                    for (int64_t h0 = 0; h0 < G; h0 += 4) {
                        const int ng = (int) std::min<int64_t>(4, G - h0);
                        float * Lh[4];
                        for (int h = 0; h < ng; ++h) Lh[h] = L + (h0 + h)*S;
                        const float * asc = ascale + it*G + h0;
                        const float * qg = qs + h0*d.r;
                        with_heads(ng, [&](auto nh) {
                            if (kt_i8) {
                                step2_range<decltype(nh)::value, true>(p0, n, d.r, rows, ex, qg, asc, mask, mrow, Lh, gs, lmax + h0);
                            } else {
                                step2_range<decltype(nh)::value, false>(p0, n, d.r, rows, ex, qg, asc, mask, mrow, Lh, gs, lmax + h0);
                            }
                        });
                    }
                }
            }
#endif
            for (int64_t p0 = c0 + n8; p0 < c1; p0 += SPARQ_BLK) {
                step2_plain(p0, std::min(c1, p0 + SPARQ_BLK));
            }
            for (int64_t hh = 0; hh < G; ++hh) {
                pmax[((size_t) ith*I + it)*G + hh] = lmax[hh];
            }
        }
    }

    // Step 3's end for this thread's positions [c0, c1) of item it, the group's scores gs complete:
    // the local window (positions >= t_local, not masked) is always selected, then this thread's
    // histogram of the scores (select_positions sums the threads')
    void close_scores(int64_t it, int32_t t_local, float * gs, int64_t c0, int64_t c1) const {
        for (int64_t p = std::max<int64_t>(c0, t_local); p < c1; ++p) {
            if (gs[p] >= 0.0f) gs[p] = INFINITY;
        }
        score_histogram(gs, c0, c1, o.hbits, hists + (((size_t) ith*I + it) << o.hbits));
    }

    // Step 2, softmax: positions split; s_hat's numerators exp(L - max) in place of the logits
    // (the only exponentials of steps 2-4), and per-thread denominators. With one head per group
    // the selection needs no normalisation: the group's scores are the numerators themselves.
    void approx_scores() {
        for (int64_t it = 0; it < I; ++it) {
            const item_info & inf = info[it];
            if (inf.dense) continue;
            int64_t c0, c1; split_range(inf.p_lo, inf.p_hi, ith, nth, c0, c1);
            float M[GGML_SPARQ_MAX_GROUP];
            head_max(it, M);
            float * L = Lall + it*G*S;
            for (int64_t hh = 0; hh < G; ++hh) {
                float * Lh = L + hh*S;
                double z = 0;
                if (c1 > c0) {
                    if (M[hh] == -INFINITY) {
                        std::fill(Lh + c0, Lh + c1, 0.0f);
                    } else {
                        z = ggml_vec_soft_max_f32((int) (c1 - c0), Lh + c0, Lh + c0, M[hh]);
                        // numerators below the smallest normal float are 0, whatever the exp gives
                        // there (subnormal or 0): ties at 0 then go to the lower position
                        for (int64_t p = c0; p < c1; ++p) Lh[p] = Lh[p] < FLT_MIN ? 0.0f : Lh[p];
                    }
                }
                psum[((size_t) ith*I + it)*G + hh] = (float) z;
            }
            if (G == 1) {
                // gs holds -1 where masked and 0 elsewhere (approx_logits); the numerator is 0 where masked
                float * gs = gsall + it*S;
                for (int64_t p = c0; p < c1; ++p) gs[p] += L[p];
                close_scores(it, inf.t_local, gs, c0, c1);
            }
        }
    }

    // Step 3, scores (more than one head per group): positions split; the group's summed,
    // normalised s_hat, +inf on the local window, and each thread's histogram of them.
    void group_scores() {
        for (int64_t it = 0; it < I; ++it) {
            const item_info & inf = info[it];
            if (inf.dense) continue;
            int64_t c0, c1; split_range(inf.p_lo, inf.p_hi, ith, nth, c0, c1);
            float zinv[GGML_SPARQ_MAX_GROUP];
            head_zinv(it, zinv);
            float * gs = gsall + it*S;
            const float * L = Lall + it*G*S;
            for (int64_t p0 = c0; p0 < c1; p0 += SPARQ_BLK) {
                const int n = (int) std::min(SPARQ_BLK, c1 - p0);
                for (int64_t hh = 0; hh < G; ++hh) {
                    ggml_vec_mad_f32(n, gs + p0, L + hh*S + p0, zinv[hh]);
                }
            }
            close_scores(it, inf.t_local, gs, c0, c1);
        }
    }

    // Step 3, selection, one item per thread: O(S) radix selection of the top k, in position order.
    void select_positions() {
        for (int64_t it = ith; it < I; it += nth) {
            item_info & inf = info[it];
            if (inf.dense) continue;
            // thread t's histogram of this item: hists + ((t*I + it) << hbits)
            inf.n_sel = select_top_k(gsall + it*S, inf.p_lo, inf.p_hi, inf.k, sel + it*S,
                                     hists + ((size_t) it << o.hbits), (size_t) I << o.hbits, nth, o.hbits, cand);
        }
    }

    // Steps 4-5: the selected rows split across threads; exact attention on their K and V rows,
    // softmax partials per thread (max, sum, weighted V) and alpha's share (s_hat over them).
    void attend_selected() {
        for (int64_t it = 0; it < I; ++it) {
            const item_info & inf = info[it];
            int64_t s, b, g; item_coords(it, s, b, g);
            const char * mrow = mask_row(mask, b, s);
            // this thread's rows: an equal share of the scattered rows and of the local window's
            // (contiguous, so cheaper to read), for the threads to finish together
            const int32_t * isel = sel + it*S;
            const int64_t n_win = inf.dense ? 0 : isel + inf.n_sel - std::lower_bound(isel, isel + inf.n_sel, inf.t_local);
            int64_t a0, a1, w0, w1;
            split_range(0, inf.n_sel - n_win, ith, nth, a0, a1);
            split_range(inf.n_sel - n_win, inf.n_sel, ith, nth, w0, w1);
            int32_t * rows = (int32_t *) cand;  // free in steps 4-5
            std::copy(isel + a0, isel + a1, rows);
            std::copy(isel + w0, isel + w1, rows + (a1 - a0));
            const float * L = Lall + it*G*S;
            float zinv[GGML_SPARQ_MAX_GROUP];
            if (!inf.dense) head_zinv(it, zinv);
            // the group's queries, contiguous, in f32 (scores are fp32: K is converted, q is not rounded)
            for (int64_t hh = 0; hh < G; ++hh) {
                memcpy(qbuf + hh*d.D, q_row(b, g*G + hh, s), d.D*sizeof(float));
            }
            float * P = part + ((size_t) ith*I + it)*G*o.part_stride;
            const int64_t na = (a1 - a0) + (w1 - w0);
            // pass 1: the scores of this thread's rows, per head (row-major: sc[hh*na + i])
            const size_t krow_bytes = ggml_row_size(k->type, d.D), vrow_bytes = ggml_row_size(v->type, d.Dv);
            const char * kbase = (const char *) k->data + g*k->nb[2] + s*k->nb[3];  // this KV head's rows
            const char * vbase = (const char *) v->data + g*v->nb[2] + s*v->nb[3];
            for (int64_t i = 0; i < na; ++i) {
                const int64_t p = rows[i];
                const char * krow = kbase + p*k->nb[1];
                if (i + SPARQ_PF < na) {  // the rows are scattered: keep several loads in flight (V's for pass 3)
                    prefetch_row(kbase + rows[i + SPARQ_PF]*k->nb[1], krow_bytes);
                    prefetch_row(vbase + rows[i + SPARQ_PF]*v->nb[1], vrow_bytes);
                }
                const float mv = mask_at(mask, mrow, p);
                float dots[GGML_SPARQ_MAX_GROUP];
#if defined(SPARQ_SIMD)
                if (k_f16 && d.D % 8 == 0) {
                    dot_group_f16((const ggml_fp16_t *) krow, qbuf, d.D, G, dots);
                } else if (k_q8) {
                    dot_group_q8_0((const block_q8_0 *) krow, qbuf, d.D, G, dots);
                } else
#endif
                {
                    const float * kr = (const float *) krow;
                    if (k_f16) { ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) krow, blk_row, d.D); kr = blk_row; }
                    if (k_q8)  { ggml_get_type_traits(k->type)->to_float(krow, blk_row, d.D); kr = blk_row; }
                    for (int64_t hh = 0; hh < G; ++hh) ggml_vec_dot_f32((int) d.D, &dots[hh], 0, kr, 0, qbuf + hh*d.D, 0, 1);
                }
                for (int64_t hh = 0; hh < G; ++hh) sc[hh*na + i] = dots[hh]*d.scale + mv;
            }
            // pass 2: softmax weights against this thread's max (vectorised exp), alpha's share
            for (int64_t hh = 0; hh < G; ++hh) {
                float * ph = P + hh*o.part_stride;
                float mx = -INFINITY;
                if (na > 0) ggml_vec_max_f32((int) na, &mx, sc + hh*na);
                ph[PART_MAX] = mx;
                ph[PART_SUM] = na > 0 ? (float) ggml_vec_soft_max_f32((int) na, sc + hh*na, sc + hh*na, mx) : 0.0f;
                float al = 0.0f;
                if (realloc && !inf.dense && na > 0) {  // alpha mixes in the mean of V only with reallocation
                    // s_hat's numerators (approx_scores) at this thread's selected rows
                    double e = 0;
                    for (int64_t i = 0; i < na; ++i) e += L[hh*S + rows[i]];
                    al = (float) e * zinv[hh];
                }
                ph[PART_ALPHA] = al;
                memset(ph + PART_ACC, 0, d.Dv*sizeof(float));
            }
            // pass 3: the weighted sum of this thread's V rows (the sums in registers where it can,
            // else one row at a time)
#if defined(SPARQ_SIMD)
            if (v_f16 && mad_rows_f16(vbase, v->nb[1], rows, na, d.Dv, G, sc, na, P + PART_ACC, o.part_stride)) {
                continue;
            }
#endif
            for (int64_t i = 0; i < na; ++i) {  // (pass 1 prefetched these rows)
                const int64_t p = rows[i];
                const char * vsrc = vbase + p*v->nb[1];
#if defined(SPARQ_SIMD)
                if (v_f16 && d.Dv % 8 == 0) {  // each 8 values converted once, for all heads of the group
                    mad_group_f16((const ggml_fp16_t *) vsrc, d.Dv, G, sc + i, na, P + PART_ACC, o.part_stride);
                    continue;
                }
                if (v_q8) {
                    mad_group_q8_0((const block_q8_0 *) vsrc, d.Dv, G, sc + i, na, P + PART_ACC, o.part_stride);
                    continue;
                }
#endif
                if (v_f16) ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) vsrc, vrow, d.Dv);
                else if (v_q8) ggml_get_type_traits(v->type)->to_float(vsrc, vrow, d.Dv);
                else memcpy(vrow, vsrc, d.Dv*sizeof(float));
                for (int64_t hh = 0; hh < G; ++hh) {
                    ggml_vec_mad_f32((int) d.Dv, P + hh*o.part_stride + PART_ACC, vrow, sc[hh*na + i]);
                }
            }
        }
    }

    // Step 6, one head per thread: merge the threads' partials, mix with the mean of V by alpha.
    void merge_and_mix() {
        for (int64_t ih = ith; ih < I*G; ih += nth) {
            const int64_t it = ih / G, hh = ih % G;
            const item_info & inf = info[it];
            int64_t s, b, g; item_coords(it, s, b, g);
            const int64_t h = g*G + hh;
            float * out = (float *) ((char *) dst->data + h*dst->nb[1] + b*dst->nb[2] + s*dst->nb[3]);
            float M = -INFINITY;
            for (int t = 0; t < nth; ++t) M = std::max(M, part[(((size_t) t*I + it)*G + hh)*o.part_stride + PART_MAX]);
            memset(out, 0, d.Dv*sizeof(float));
            if (inf.n_sel == 0 || M == -INFINITY) continue;
            // a sink is one more term of the denominator, with no value row; it is always chosen
            const float sk = sink(it, hh);
            M = std::max(M, sk);
            double Ssum = sinks ? std::exp((double) sk - M) : 0.0, alpha = 0;
            if (sinks && realloc && !inf.dense) {
                float zinv[GGML_SPARQ_MAX_GROUP], sink_hat[GGML_SPARQ_MAX_GROUP];
                head_zinv(it, zinv, sink_hat);
                alpha = sink_hat[hh];
            }
            for (int t = 0; t < nth; ++t) {
                const float * ph = part + (((size_t) t*I + it)*G + hh)*o.part_stride;
                alpha += ph[PART_ALPHA];
                if (ph[PART_MAX] == -INFINITY) continue;
                const float f = std::exp(ph[PART_MAX] - M);
                Ssum += ph[PART_SUM]*f;
                ggml_vec_mad_f32((int) d.Dv, out, ph + PART_ACC, f);
            }
            if (inf.dense) alpha = 1.0;
            const float ys = (float) (1.0 / Ssum);
            if (realloc) {
                const float * vm = (const float *) ((const char *) vmean->data + g*vmean->nb[1] + b*vmean->nb[2] + s*vmean->nb[3]);
                const float fa = (float) alpha * ys, fm = (float) (1.0 - alpha);
                for (int64_t j = 0; j < d.Dv; ++j) out[j] = out[j]*fa + fm*vm[j];
            } else {
                ggml_vec_scale_f32((int) d.Dv, out, ys);
            }
        }
    }
};

void sparq_attn_fast(const ggml_compute_params * params, ggml_tensor * dst) {
    sparq_run run(params, dst);
    run.scan_items();
    ggml_barrier(params->threadpool);
    run.approx_logits();
    ggml_barrier(params->threadpool);
    run.approx_scores();
    ggml_barrier(params->threadpool);
    if (run.G > 1) {
        run.group_scores();
        ggml_barrier(params->threadpool);
    }
    run.select_positions();
    ggml_barrier(params->threadpool);
    run.attend_selected();
    ggml_barrier(params->threadpool);
    run.merge_and_mix();
}

} // namespace

extern "C" {

size_t ggml_sparq_attn_work_size(const struct ggml_tensor * node, int n_tasks) {
    return get_layout(get_dims(node), n_tasks).total * 4;
}

bool ggml_sparq_attn_supported(const struct ggml_tensor * op) {
    // testing: make the CPU backend report no SparQ kernel, as a backend without one would
    static const bool force_unsupported = getenv("GGML_SPARQ_FORCE_UNSUPPORTED") != nullptr;
    if (force_unsupported) {
        return false;
    }
    const ggml_tensor * q = op->src[0], * k = op->src[1], * v = op->src[2], * mask = op->src[3], * kt = op->src[4];
    // K^T in F16 or F32, or I8 with its exponent row (D + 1 rows); K and V rows also in Q8_0 (whole blocks per row)
    auto ok_kv = [](const ggml_tensor * t, bool q8) {
        if (q8 && t->type == GGML_TYPE_Q8_0) {
            return t->ne[0] % QK8_0 == 0 && t->nb[0] == ggml_type_size(t->type);
        }
        return (t->type == GGML_TYPE_F16 || t->type == GGML_TYPE_F32) && t->nb[0] == ggml_type_size(t->type);
    };
    const bool kt_ok = kt->type == GGML_TYPE_I8 ? kt->nb[0] == 1 && kt->ne[1] == q->ne[0] + 1 : ok_kv(kt, false);
    const ggml_tensor * sinks = op->src[6];
    const bool sinks_ok = sinks == nullptr || (sinks->type == GGML_TYPE_F32 && ggml_is_contiguous(sinks));
    return sinks_ok && q->type == GGML_TYPE_F32 && q->nb[0] == sizeof(float) && ok_kv(k, true) && kt_ok && ok_kv(v, true) &&
           op->type == GGML_TYPE_F32 &&
           (mask->type == GGML_TYPE_F16 || mask->type == GGML_TYPE_F32) &&
           q->ne[2] / k->ne[2] <= GGML_SPARQ_MAX_GROUP && q->ne[0] <= GGML_SPARQ_MAX_HEAD_SIZE &&
           v->ne[0] <= GGML_SPARQ_MAX_HEAD_SIZE;
}

void ggml_compute_forward_sparq_attn(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    if (params->use_ref) {
        if (params->ith == 0) {
            attn_ref(dst);
        }
        return;
    }
    sparq_attn_fast(params, dst);
}

} // extern "C"
