// sparq-cpp: the inner loops of the CPU kernel (sparq.cpp), each with its x86 SIMD path
// (AVX2/F16C/FMA) and a plain one: the mask scan, the selection's histogram and top-k, step 2's
// approximate logits, and the dot products of a K row with a group's queries.
#pragma once

#include "sparq-impl.h"

#include <algorithm>
#include <cmath>
#include <functional>

namespace ggml_sparq {

// split [lo, hi) into nth pieces aligned to 16 positions; returns thread ith's piece
inline void split_range(int64_t lo, int64_t hi, int ith, int nth, int64_t & c0, int64_t & c1) {
    const int64_t n = hi - lo;
    const int64_t chunk = ((n + nth - 1) / nth + 15) & ~int64_t(15);
    c0 = std::min(hi, lo + ith*chunk);
    c1 = std::min(hi, c0 + chunk);
}

// Histogram of the top hbits bits of the scores gs[c0, c1) that are >= 0 (or +inf): their bit
// patterns order like the values. Each thread counts its own positions (step 3).
inline void score_histogram(const float * gs, int64_t c0, int64_t c1, int hbits, int32_t * hist) {
    memset(hist, 0, sizeof(int32_t) << hbits);
    const uint32_t * bits = (const uint32_t *) gs;
    for (int64_t p = c0; p < c1; ++p) {
        const uint32_t u = bits[p];
        if (!(u >> 31)) {
            hist[u >> (32 - hbits)]++;
        }
    }
}

// Top-k of gs[lo, hi) (entries < 0 are never chosen), written in position order to sel, from the
// threads' histograms (hists[t]; summed into hists[0]): the bin holding the k-th largest, an
// nth_element over that bin's members for the exact threshold T, then one pass that emits the
// scores above T and the first ties at T (ties go to the lower positions). As int32, the scores'
// bits compare like the values and masked entries (sign bit set) are below every threshold.
inline int32_t select_top_k(const float * gs, int64_t lo, int64_t hi, int32_t k, int32_t * sel,
                     int32_t * const * hists, int nh, int hbits, uint32_t * cand) {
    const int64_t nbins = int64_t(1) << hbits;
    int32_t * hist = hists[0];
    for (int t = 1; t < nh; ++t) {
        for (int64_t i = 0; i < nbins; ++i) hist[i] += hists[t][i];
    }
    int32_t above = 0;
    int64_t bin = nbins/2 - 1;  // the sign bit is clear
    for (; bin > 0; --bin) {
        if (above + hist[bin] >= k) break;
        above += hist[bin];
    }
    const int32_t need = k - above;  // how many to take from the threshold bin
    const int32_t * ibits = (const int32_t *) gs;
    // members of the bin: lo_b < u <= hi_b
    const int32_t lo_b = (int32_t) ((uint32_t) bin << (32 - hbits)) - 1;
    const int32_t hi_b = (int32_t) std::min<int64_t>(((int64_t) bin + 1) << (32 - hbits), INT32_MAX + int64_t(1)) - 1;
    int32_t nc = 0;
    int64_t p = lo;
#if defined(__AVX2__)
    {
        const __m256i vlo = _mm256_set1_epi32(lo_b), vhi = _mm256_set1_epi32(hi_b);
        for (; p + 8 <= hi; p += 8) {
            const __m256i u = _mm256_loadu_si256((const __m256i *) (ibits + p));
            int m = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpgt_epi32(u, vhi), _mm256_cmpgt_epi32(u, vlo))));
            while (m) { cand[nc++] = (uint32_t) ibits[p + __builtin_ctz(m)]; m &= m - 1; }
        }
    }
#endif
    for (; p < hi; ++p) {
        if (ibits[p] > lo_b && ibits[p] <= hi_b) cand[nc++] = (uint32_t) ibits[p];
    }
    std::nth_element(cand, cand + (need - 1), cand + nc, std::greater<uint32_t>());
    const int32_t T = (int32_t) cand[need - 1];
    int32_t gt = 0;
    for (int32_t i = 0; i < nc; ++i) gt += (int32_t) cand[i] > T;
    int32_t ties = need - gt;
    int32_t n = 0;
    p = lo;
#if defined(__AVX2__)
    {
        const __m256i vt = _mm256_set1_epi32(T);
        for (; p + 8 <= hi; p += 8) {
            const __m256i u = _mm256_loadu_si256((const __m256i *) (ibits + p));
            int m = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(u, vt)));
            if (ties > 0 && _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(u, vt)))) {
                for (int e = 0; e < 8; ++e) {
                    if (ibits[p + e] > T || (ibits[p + e] == T && ties-- > 0)) sel[n++] = (int32_t) (p + e);
                }
                continue;
            }
            while (m) { sel[n++] = (int32_t) (p + __builtin_ctz(m)); m &= m - 1; }
        }
    }
#endif
    for (; p < hi; ++p) {
        if (ibits[p] > T || (ibits[p] == T && ties-- > 0)) sel[n++] = (int32_t) p;
    }
    return n;
}

// visible positions of a mask row: count, first, one past the last (p_lo = S, p_hi = 0 if none)
inline void scan_visible(const ggml_tensor * mask, const char * mrow, int64_t S, int32_t & n_vis, int32_t & p_lo, int32_t & p_hi) {
    n_vis = 0; p_lo = (int32_t) S; p_hi = 0;
    int64_t p = 0;
#if defined(__AVX2__)
    if (mask->type == GGML_TYPE_F16) {  // 16 positions a step: 2 bits of the byte mask each
        const __m256i ninf = _mm256_set1_epi16((short) 0xFC00);
        for (; p + 16 <= S; p += 16) {
            const __m256i x = _mm256_loadu_si256((const __m256i *) ((const uint16_t *) mrow + p));
            const uint32_t vis = ~(uint32_t) _mm256_movemask_epi8(_mm256_cmpeq_epi16(x, ninf));
            if (vis) {
                if (n_vis == 0) p_lo = (int32_t) (p + __builtin_ctz(vis)/2);
                p_hi = (int32_t) (p + (31 - __builtin_clz(vis))/2 + 1);
                n_vis += __builtin_popcount(vis)/2;
            }
        }
    } else {
        const __m256i ninf = _mm256_set1_epi32((int) 0xFF800000u);
        for (; p + 8 <= S; p += 8) {
            const __m256i x = _mm256_loadu_si256((const __m256i *) ((const float *) mrow + p));
            const uint32_t vis = ~(uint32_t) _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(x, ninf))) & 0xFFu;
            if (vis) {
                if (n_vis == 0) p_lo = (int32_t) (p + __builtin_ctz(vis));
                p_hi = (int32_t) (p + (31 - __builtin_clz(vis)) + 1);
                n_vis += __builtin_popcount(vis);
            }
        }
    }
#endif
    for (; p < S; ++p) {
        if (!masked_at(mask, mrow, p)) {
            if (n_vis == 0) p_lo = (int32_t) p;
            p_hi = (int32_t) p + 1;
            n_vis++;
        }
    }
}

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// Step 2 for NG (<= 4) heads of a group over positions [p0, p0 + n), n a multiple of 8*NV: the
// NG*NV accumulators (NV vectors of 8 positions per head) stay in registers across the r rows of
// K^T (f16, converted on the fly; rows[jj] is row i1[jj] at position 0, qs[jj*NG + h] the query
// value it multiplies), then logits = acc*ascale + mask, -inf where masked; running max per
// head; gs = -1 where masked, 0 elsewhere.
template <int NG, int NV>
inline void step2_avx2(int64_t p0, int64_t n, int r, const ggml_fp16_t * const * rows, const float * qs,
                const float * asc, const ggml_tensor * mask, const char * mrow,
                float * const * Lh, float * gs, float * lmax) {
    __m256 vmax[NG];
    for (int h = 0; h < NG; ++h) vmax[h] = _mm256_set1_ps(lmax[h]);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 8*NV) {
        const int64_t p = p0 + i;
        __m256 a[NG][NV];
        for (int h = 0; h < NG; ++h) for (int u = 0; u < NV; ++u) a[h][u] = _mm256_setzero_ps();
        for (int jj = 0; jj < r; ++jj) {
            __m256 x[NV];
            for (int u = 0; u < NV; ++u) x[u] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (rows[jj] + p + 8*u)));
            for (int h = 0; h < NG; ++h) {
                const __m256 qb = _mm256_broadcast_ss(qs + jj*NG + h);
                for (int u = 0; u < NV; ++u) a[h][u] = _mm256_fmadd_ps(x[u], qb, a[h][u]);
            }
        }
        for (int u = 0; u < NV; ++u) {
            const int64_t pu = p + 8*u;
            __m256 m;
            if (mask->type == GGML_TYPE_F16) {
                m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) ((const ggml_fp16_t *) mrow + pu)));
            } else {
                m = _mm256_loadu_ps((const float *) mrow + pu);
            }
            const __m256 is_masked = _mm256_cmp_ps(m, ninf, _CMP_EQ_OQ);
            _mm256_storeu_ps(gs + pu, _mm256_and_ps(is_masked, _mm256_set1_ps(-1.0f)));
            for (int h = 0; h < NG; ++h) {
                const __m256 x = _mm256_blendv_ps(_mm256_fmadd_ps(a[h][u], _mm256_set1_ps(asc[h]), m), ninf, is_masked);
                _mm256_storeu_ps(Lh[h] + pu, x);
                vmax[h] = _mm256_max_ps(vmax[h], x);
            }
        }
    }
    for (int h = 0; h < NG; ++h) {
        float t[8];
        _mm256_storeu_ps(t, vmax[h]);
        for (int e = 0; e < 8; ++e) lmax[h] = std::max(lmax[h], t[e]);
    }
}

// the above on [p0, p0 + n), n a multiple of 8: wide blocks, then single vectors
template <int NG>
inline void step2_avx2_range(int64_t p0, int64_t n, int r, const ggml_fp16_t * const * rows, const float * qs,
                      const float * asc, const ggml_tensor * mask, const char * mrow,
                      float * const * Lh, float * gs, float * lmax) {
    constexpr int NV = NG <= 2 ? 4 : 2;
    const int64_t nw = n - n % (8*NV);
    step2_avx2<NG, NV>(p0, nw, r, rows, qs, asc, mask, mrow, Lh, gs, lmax);
    step2_avx2<NG, 1>(p0 + nw, n - nw, r, rows, qs, asc, mask, mrow, Lh, gs, lmax);
}
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// dots of one f16 K row with the G f32 queries of a group (q: G rows of D), D a multiple of 8;
// each 8 values of K are converted once and used by up to 4 heads
inline void dot_group_f16(const ggml_fp16_t * kr, const float * q, int64_t D, int64_t G, float * out) {
    for (int64_t h0 = 0; h0 < G; h0 += 4) {
        const int64_t ng = std::min<int64_t>(4, G - h0);
        const float * q0 = q + h0*D;
        __m256 a[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps() };
        for (int64_t j = 0; j < D; j += 8) {
            const __m256 kv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (kr + j)));
            for (int64_t h = 0; h < ng; ++h) a[h] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q0 + h*D + j), a[h]);
        }
        for (int64_t h = 0; h < ng; ++h) {
            __m128 x = _mm_add_ps(_mm256_castps256_ps128(a[h]), _mm256_extractf128_ps(a[h], 1));
            x = _mm_add_ps(x, _mm_movehl_ps(x, x));
            x = _mm_add_ss(x, _mm_movehdup_ps(x));
            out[h0 + h] = _mm_cvtss_f32(x);
        }
    }
}

// the same for a Q8_0 K row (D a multiple of 32): each 8 values are scaled once
inline void dot_group_q8_0(const block_q8_0 * kr, const float * q, int64_t D, int64_t G, float * out) {
    for (int64_t h0 = 0; h0 < G; h0 += 4) {
        const int64_t ng = std::min<int64_t>(4, G - h0);
        const float * q0 = q + h0*D;
        __m256 a[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps() };
        for (int64_t ib = 0; ib < D/QK8_0; ++ib) {
            const __m256 dv = _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(kr[ib].d));
            for (int64_t j = 0; j < QK8_0; j += 8) {
                const __m256 kv = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (kr[ib].qs + j)))));
                for (int64_t h = 0; h < ng; ++h) a[h] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q0 + h*D + ib*QK8_0 + j), a[h]);
            }
        }
        for (int64_t h = 0; h < ng; ++h) {
            __m128 x = _mm_add_ps(_mm256_castps256_ps128(a[h]), _mm256_extractf128_ps(a[h], 1));
            x = _mm_add_ps(x, _mm_movehl_ps(x, x));
            x = _mm_add_ss(x, _mm_movehdup_ps(x));
            out[h0 + h] = _mm_cvtss_f32(x);
        }
    }
}
#endif

} // namespace ggml_sparq
