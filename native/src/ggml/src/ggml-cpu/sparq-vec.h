// sparq-cpp: the inner loops of the CPU kernel (sparq.cpp), each with its x86 path (AVX2, F16C,
// FMA; AVX-512 where the build has it and it measured faster), its ARM path (AArch64 NEON) and a
// plain one: the mask scan, the selection's histogram and compare passes, step 2's approximate
// logits, the dot products of a K row with a group's queries, and the accumulation of V rows
// into a group's sums. Both vector paths compute in fp32 (f16 and
// q8_0 values converted on the fly), in the same order of operations where it matters for the
// selection (the logits are one fused multiply-add of the accumulated dot and tau's scale onto
// the mask), so they select what the plain path and the reference select.
#pragma once

#include "sparq-impl.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <type_traits>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define SPARQ_SIMD_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define SPARQ_SIMD_NEON 1
#endif
#if defined(SPARQ_SIMD_AVX2) || defined(SPARQ_SIMD_NEON)
#define SPARQ_SIMD 1  // step2_range, dot_group_* and mad_group_* exist (f16 K^T, f16/q8_0 K and V)
#endif

namespace ggml_sparq {

// f(std::integral_constant<int, NG>{}) for a group of ng heads, 1 to 4 (4 for more): the kernels
// below take a group's head count as a template parameter, so that their per-head arrays live in
// registers; a caller walks G heads 4 at a time and hands each block's count here
template <typename F> inline void with_heads(int64_t ng, F && f) {
    switch (ng) {
        case 1:  f(std::integral_constant<int, 1>{}); break;
        case 2:  f(std::integral_constant<int, 2>{}); break;
        case 3:  f(std::integral_constant<int, 3>{}); break;
        default: f(std::integral_constant<int, 4>{}); break;
    }
}

#if defined(SPARQ_SIMD_NEON)
// lanes of a NEON compare result as bits of a 64-bit word: 8 bits per 16-bit lane, 16 per 32-bit lane
inline uint64_t neon_bits_u16(uint16x8_t m) { return vget_lane_u64(vreinterpret_u64_u8(vshrn_n_u16(m, 4)), 0); }
inline uint64_t neon_bits_u32(uint32x4_t m) { return vget_lane_u64(vreinterpret_u64_u16(vmovn_u32(m)), 0); }
inline const float16_t * f16p(const ggml_fp16_t * p) { return (const float16_t *) p; }
#endif

// split [lo, hi) into nth pieces aligned to 16 positions; returns thread ith's piece
inline void split_range(int64_t lo, int64_t hi, int ith, int nth, int64_t & c0, int64_t & c1) {
    const int64_t n = hi - lo;
    const int64_t chunk = ((n + nth - 1) / nth + 15) & ~int64_t(15);
    c0 = std::min(hi, lo + ith*chunk);
    c1 = std::min(hi, c0 + chunk);
}

// the selection's histograms have at most 2^SPARQ_HBITS bins
constexpr int SPARQ_HBITS = 12;

// Histogram of the top hbits bits of the scores gs[c0, c1) that are >= 0 (or +inf): their bit
// patterns order like the values. Each thread counts its own positions (step 3). Neighbouring
// positions often share a bin: even and odd positions count into two histograms, so that two
// increments of one counter are not back to back, then the two are added.
inline void score_histogram(const float * gs, int64_t c0, int64_t c1, int hbits, int32_t * hist) {
    const size_t nb = size_t(1) << hbits;
    int32_t odd[size_t(1) << SPARQ_HBITS];
    memset(hist, 0, nb*sizeof(int32_t));
    memset(odd, 0, nb*sizeof(int32_t));
    const uint32_t * bits = (const uint32_t *) gs;
    const int sh = 32 - hbits;
    int64_t p = c0;
    for (; p + 2 <= c1; p += 2) {
        const uint32_t u0 = bits[p], u1 = bits[p + 1];
        if (!(u0 >> 31)) hist[u0 >> sh]++;
        if (!(u1 >> 31)) odd[u1 >> sh]++;
    }
    if (p < c1 && !(bits[p] >> 31)) hist[bits[p] >> sh]++;
    for (size_t i = 0; i < nb; ++i) hist[i] += odd[i];
}

// Top-k of gs[lo, hi) (entries < 0 are never chosen), written in position order to sel, from the
// nh threads' histograms (thread t's at hist0 + t*hstride; summed into thread 0's): the bin
// holding the k-th largest, an nth_element over that bin's members for the exact threshold T,
// then one pass that emits the scores above T and the first ties at T (ties go to the lower
// positions). As int32, the scores' bits compare like the values and masked entries (sign bit
// set) are below every threshold.
inline int32_t select_top_k(const float * gs, int64_t lo, int64_t hi, int32_t k, int32_t * sel,
                     int32_t * hist0, size_t hstride, int nh, int hbits, uint32_t * cand) {
    const int64_t nbins = int64_t(1) << hbits;
    int32_t * hist = hist0;
    for (int t = 1; t < nh; ++t) {
        for (int64_t i = 0; i < nbins; ++i) hist[i] += hist0[t*hstride + i];
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
    // (the top bin's bound is INT32_MAX: subtract in 64 bits, then narrow)
    const int32_t hi_b = (int32_t) (std::min<int64_t>(((int64_t) bin + 1) << (32 - hbits), INT32_MAX + int64_t(1)) - 1);
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
#elif defined(SPARQ_SIMD_NEON)
    {
        const int32x4_t vlo = vdupq_n_s32(lo_b), vhi = vdupq_n_s32(hi_b);
        for (; p + 4 <= hi; p += 4) {
            const int32x4_t u = vld1q_s32(ibits + p);
            uint64_t m = neon_bits_u32(vandq_u32(vcgtq_s32(u, vlo), vcleq_s32(u, vhi)));
            while (m) { const int e = __builtin_ctzll(m)/16; cand[nc++] = (uint32_t) ibits[p + e]; m &= ~(0xFFFFull << 16*e); }
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
#elif defined(SPARQ_SIMD_NEON)
    {
        const int32x4_t vt = vdupq_n_s32(T);
        for (; p + 4 <= hi; p += 4) {
            const int32x4_t u = vld1q_s32(ibits + p);
            if (ties > 0 && vmaxvq_u32(vceqq_s32(u, vt))) {
                for (int e = 0; e < 4; ++e) {
                    if (ibits[p + e] > T || (ibits[p + e] == T && ties-- > 0)) sel[n++] = (int32_t) (p + e);
                }
                continue;
            }
            uint64_t m = neon_bits_u32(vcgtq_s32(u, vt));
            while (m) { const int e = __builtin_ctzll(m)/16; sel[n++] = (int32_t) (p + e); m &= ~(0xFFFFull << 16*e); }
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
#elif defined(SPARQ_SIMD_NEON)
    if (mask->type == GGML_TYPE_F16) {  // 8 positions a step: 8 bits each
        const uint16x8_t ninf = vdupq_n_u16(0xFC00);
        for (; p + 8 <= S; p += 8) {
            const uint64_t vis = ~neon_bits_u16(vceqq_u16(vld1q_u16((const uint16_t *) mrow + p), ninf));
            if (vis) {
                if (n_vis == 0) p_lo = (int32_t) (p + __builtin_ctzll(vis)/8);
                p_hi = (int32_t) (p + (63 - __builtin_clzll(vis))/8 + 1);
                n_vis += __builtin_popcountll(vis)/8;
            }
        }
    } else {  // 4 positions a step: 16 bits each
        const uint32x4_t ninf = vdupq_n_u32(0xFF800000u);
        for (; p + 4 <= S; p += 4) {
            const uint64_t vis = ~neon_bits_u32(vceqq_u32(vld1q_u32((const uint32_t *) mrow + p), ninf));
            if (vis) {
                if (n_vis == 0) p_lo = (int32_t) (p + __builtin_ctzll(vis)/16);
                p_hi = (int32_t) (p + (63 - __builtin_clzll(vis))/16 + 1);
                n_vis += __builtin_popcountll(vis)/16;
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

#if defined(SPARQ_SIMD_AVX2)
// Step 2 for NG (<= 4) heads of a group over positions [p0, p0 + n), n a multiple of 8*NV: the
// NG*NV accumulators (NV vectors of 8 positions per head) stay in registers across the r rows of
// K^T (f16, or I8 times 2^ex[p], converted on the fly; rows[jj] is row i1[jj] at position 0, qs[jj*NG + h] the query
// value it multiplies), then logits = acc*ascale + mask, -inf where masked; running max per
// head; gs = -1 where masked, 0 elsewhere.
template <int NG, int NV, bool I8>
inline void step2_avx2(int64_t p0, int64_t n, int r, const void * const * rows, const int8_t * ex, const float * qs,
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
            for (int u = 0; u < NV; ++u) {
                x[u] = I8 ? _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) ((const int8_t *) rows[jj] + p + 8*u))))
                          : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) ((const ggml_fp16_t *) rows[jj] + p + 8*u)));
            }
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
            if (I8) {  // times 2^e: the float whose exponent field is e + 127
                const __m256i e = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (ex + pu)));
                const __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
                for (int h = 0; h < NG; ++h) a[h][u] = _mm256_mul_ps(a[h][u], sc);
            }
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

#endif

#if defined(__AVX512F__)
// Step 2 as step2_avx2 with AVX-512: units of 16 positions, n a multiple of 16*NV
template <int NG, int NV, bool I8>
inline void step2_avx512(int64_t p0, int64_t n, int r, const void * const * rows, const int8_t * ex, const float * qs,
                         const float * asc, const ggml_tensor * mask, const char * mrow,
                         float * const * Lh, float * gs, float * lmax) {
    __m512 vmax[NG];
    for (int h = 0; h < NG; ++h) vmax[h] = _mm512_set1_ps(lmax[h]);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 16*NV) {
        const int64_t p = p0 + i;
        __m512 a[NG][NV];
        for (int h = 0; h < NG; ++h) for (int u = 0; u < NV; ++u) a[h][u] = _mm512_setzero_ps();
        for (int jj = 0; jj < r; ++jj) {
            __m512 x[NV];
            for (int u = 0; u < NV; ++u) {
                x[u] = I8 ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) ((const int8_t *) rows[jj] + p + 16*u))))
                          : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) ((const ggml_fp16_t *) rows[jj] + p + 16*u)));
            }
            for (int h = 0; h < NG; ++h) {
                const __m512 qb = _mm512_set1_ps(qs[jj*NG + h]);
                for (int u = 0; u < NV; ++u) a[h][u] = _mm512_fmadd_ps(x[u], qb, a[h][u]);
            }
        }
        for (int u = 0; u < NV; ++u) {
            const int64_t pu = p + 16*u;
            const __m512 m = mask->type == GGML_TYPE_F16
                ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) ((const ggml_fp16_t *) mrow + pu)))
                : _mm512_loadu_ps((const float *) mrow + pu);
            const __mmask16 is_masked = _mm512_cmp_ps_mask(m, ninf, _CMP_EQ_OQ);
            _mm512_storeu_ps(gs + pu, _mm512_maskz_mov_ps(is_masked, _mm512_set1_ps(-1.0f)));
            if (I8) {
                const __m512i e = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) (ex + pu)));
                const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(127)), 23));
                for (int h = 0; h < NG; ++h) a[h][u] = _mm512_mul_ps(a[h][u], sc);
            }
            for (int h = 0; h < NG; ++h) {
                const __m512 x = _mm512_mask_mov_ps(_mm512_fmadd_ps(a[h][u], _mm512_set1_ps(asc[h]), m), is_masked, ninf);
                _mm512_storeu_ps(Lh[h] + pu, x);
                vmax[h] = _mm512_max_ps(vmax[h], x);
            }
        }
    }
    for (int h = 0; h < NG; ++h) lmax[h] = std::max(lmax[h], _mm512_reduce_max_ps(vmax[h]));
}
#endif

#if defined(SPARQ_SIMD_NEON)
// Step 2 as step2_avx2, with NEON: NV units of 8 positions (two vectors of 4) per head in
// registers, f16 K^T converted on the fly, logits = acc*ascale + mask in one fused multiply-add
template <int NG, int NV, bool I8>
inline void step2_neon(int64_t p0, int64_t n, int r, const void * const * rows, const int8_t * ex, const float * qs,
                       const float * asc, const ggml_tensor * mask, const char * mrow,
                       float * const * Lh, float * gs, float * lmax) {
    float32x4_t vmax[NG];
    for (int h = 0; h < NG; ++h) vmax[h] = vdupq_n_f32(lmax[h]);
    const float32x4_t ninf = vdupq_n_f32(-INFINITY);
    const uint32x4_t neg1 = vreinterpretq_u32_f32(vdupq_n_f32(-1.0f));
    for (int64_t i = 0; i < n; i += 8*NV) {
        const int64_t p = p0 + i;
        float32x4_t a[NG][2*NV];
        for (int h = 0; h < NG; ++h) for (int e = 0; e < 2*NV; ++e) a[h][e] = vdupq_n_f32(0.0f);
        for (int jj = 0; jj < r; ++jj) {
            float32x4_t x[2*NV];
            for (int u = 0; u < NV; ++u) {
                if (I8) {
                    const int16x8_t w = vmovl_s8(vld1_s8((const int8_t *) rows[jj] + p + 8*u));
                    x[2*u]     = vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)));
                    x[2*u + 1] = vcvtq_f32_s32(vmovl_high_s16(w));
                } else {
                    const float16x8_t hx = vld1q_f16(f16p((const ggml_fp16_t *) rows[jj] + p + 8*u));
                    x[2*u]     = vcvt_f32_f16(vget_low_f16(hx));
                    x[2*u + 1] = vcvt_high_f32_f16(hx);
                }
            }
            for (int h = 0; h < NG; ++h) {
                const float32x4_t qb = vdupq_n_f32(qs[jj*NG + h]);
                for (int e = 0; e < 2*NV; ++e) a[h][e] = vfmaq_f32(a[h][e], x[e], qb);
            }
        }
        for (int e = 0; e < 2*NV; ++e) {
            const int64_t pe = p + 4*e;
            const float32x4_t m = mask->type == GGML_TYPE_F16 ? vcvt_f32_f16(vld1_f16(f16p((const ggml_fp16_t *) mrow + pe)))
                                                              : vld1q_f32((const float *) mrow + pe);
            const uint32x4_t is_masked = vceqq_f32(m, ninf);
            vst1q_f32(gs + pe, vreinterpretq_f32_u32(vandq_u32(is_masked, neg1)));
            if (I8) {
                const int16x8_t ew = vmovl_s8(vld1_s8(ex + p + 8*(e/2)));
                const int32x4_t ei = e % 2 == 0 ? vmovl_s16(vget_low_s16(ew)) : vmovl_high_s16(ew);
                const float32x4_t sc = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(ei, vdupq_n_s32(127)), 23));
                for (int h = 0; h < NG; ++h) a[h][e] = vmulq_f32(a[h][e], sc);
            }
            for (int h = 0; h < NG; ++h) {
                const float32x4_t x = vbslq_f32(is_masked, ninf, vfmaq_f32(m, a[h][e], vdupq_n_f32(asc[h])));
                vst1q_f32(Lh[h] + pe, x);
                vmax[h] = vmaxq_f32(vmax[h], x);
            }
        }
    }
    for (int h = 0; h < NG; ++h) lmax[h] = std::max(lmax[h], vmaxvq_f32(vmax[h]));
}
#endif

#if defined(SPARQ_SIMD)
// Step 2 for NG (<= 4) heads of a group over positions [p0, p0 + n), n a multiple of 8: wide
// blocks, then single units; rows[jj] is K^T row i1[jj] (f16, or I8 with exponents ex) at position 0, qs[jj*NG + h] the
// query value it multiplies, asc[h] the heads' scales; writes the logits (-inf where masked) to
// Lh[h], gs = -1 where masked and 0 elsewhere, and raises lmax[h] to the logits' max.
template <int NG, bool I8>
inline void step2_range(int64_t p0, int64_t n, int r, const void * const * rows, const int8_t * ex, const float * qs,
                        const float * asc, const ggml_tensor * mask, const char * mrow,
                        float * const * Lh, float * gs, float * lmax) {
    constexpr int NV = NG <= 2 ? 4 : 2;
    const int64_t nw = n - n % (8*NV);
#if defined(__AVX512F__)
    const int64_t n16 = n - n % (16*NV);
    step2_avx512<NG, NV, I8>(p0, n16, r, rows, ex, qs, asc, mask, mrow, Lh, gs, lmax);
    step2_avx2<NG, 1, I8>(p0 + n16, n - n16, r, rows, ex, qs, asc, mask, mrow, Lh, gs, lmax);
    (void) nw;
#elif defined(SPARQ_SIMD_AVX2)
    step2_avx2<NG, NV, I8>(p0, nw, r, rows, ex, qs, asc, mask, mrow, Lh, gs, lmax);
    step2_avx2<NG, 1, I8>(p0 + nw, n - nw, r, rows, ex, qs, asc, mask, mrow, Lh, gs, lmax);
#else
    step2_neon<NG, NV, I8>(p0, nw, r, rows, ex, qs, asc, mask, mrow, Lh, gs, lmax);
    step2_neon<NG, 1, I8>(p0 + nw, n - nw, r, rows, ex, qs, asc, mask, mrow, Lh, gs, lmax);
#endif
}
#endif

#if defined(SPARQ_SIMD_AVX2)
inline float hsum(__m256 a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}
#endif

#if defined(SPARQ_SIMD)
// dots of one f16 K row with NG (<= 4) f32 queries (q: NG rows of D), D a multiple of 8; each
// vector of K is converted once and used by every head; the sums stay in registers. No AVX-512
// path: 16 lanes would sum in another order than AVX2's 8, and the chosen rows of later tokens
// (whose K and V come from these outputs) would then differ from an AVX2 build's by more than
// rounding (measured: gemma3 1/8 perplexity ratio 1.070 -> 1.103 in tests/test_sparq.py).
template <int NG>
inline void dot_heads_f16(const ggml_fp16_t * kr, const float * q, int64_t D, float * out) {
#if defined(SPARQ_SIMD_AVX2)
    __m256 a[NG];
    for (int h = 0; h < NG; ++h) a[h] = _mm256_setzero_ps();
    for (int64_t j = 0; j < D; j += 8) {
        const __m256 kv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (kr + j)));
        for (int h = 0; h < NG; ++h) a[h] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q + h*D + j), a[h]);
    }
    for (int h = 0; h < NG; ++h) out[h] = hsum(a[h]);
#else
    float32x4_t a[NG];
    for (int h = 0; h < NG; ++h) a[h] = vdupq_n_f32(0.0f);
    for (int64_t j = 0; j < D; j += 8) {
        const float16x8_t hk = vld1q_f16(f16p(kr + j));
        const float32x4_t lo = vcvt_f32_f16(vget_low_f16(hk)), hi = vcvt_high_f32_f16(hk);
        for (int h = 0; h < NG; ++h) {
            a[h] = vfmaq_f32(a[h], lo, vld1q_f32(q + h*D + j));
            a[h] = vfmaq_f32(a[h], hi, vld1q_f32(q + h*D + j + 4));
        }
    }
    for (int h = 0; h < NG; ++h) out[h] = vaddvq_f32(a[h]);
#endif
}

// dots of one f16 K row with the G f32 queries of a group (q: G rows of D), D a multiple of 8
inline void dot_group_f16(const ggml_fp16_t * kr, const float * q, int64_t D, int64_t G, float * out) {
    for (int64_t h0 = 0; h0 < G; h0 += 4) {
        with_heads(G - h0, [&](auto nh) { dot_heads_f16<decltype(nh)::value>(kr, q + h0*D, D, out + h0); });
    }
}

// the same for a Q8_0 K row (D a multiple of 32): each 8 values are scaled once
inline void dot_group_q8_0(const block_q8_0 * kr, const float * q, int64_t D, int64_t G, float * out) {
    for (int64_t h0 = 0; h0 < G; h0 += 4) {
        const int64_t ng = std::min<int64_t>(4, G - h0);
        const float * q0 = q + h0*D;
#if defined(SPARQ_SIMD_AVX2)
        __m256 a[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps() };
        for (int64_t ib = 0; ib < D/QK8_0; ++ib) {
            const __m256 dv = _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(kr[ib].d));
            for (int64_t j = 0; j < QK8_0; j += 8) {
                const __m256 kv = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (kr[ib].qs + j)))));
                for (int64_t h = 0; h < ng; ++h) a[h] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q0 + h*D + ib*QK8_0 + j), a[h]);
            }
        }
        for (int64_t h = 0; h < ng; ++h) out[h0 + h] = hsum(a[h]);
#else
        float32x4_t a[4] = { vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f) };
        for (int64_t ib = 0; ib < D/QK8_0; ++ib) {
            const float dv = GGML_CPU_FP16_TO_FP32(kr[ib].d);
            for (int64_t j = 0; j < QK8_0; j += 8) {
                const int16x8_t w = vmovl_s8(vld1_s8(kr[ib].qs + j));
                const float32x4_t lo = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), dv);
                const float32x4_t hi = vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(w)), dv);
                for (int64_t h = 0; h < ng; ++h) {
                    a[h] = vfmaq_f32(a[h], lo, vld1q_f32(q0 + h*D + ib*QK8_0 + j));
                    a[h] = vfmaq_f32(a[h], hi, vld1q_f32(q0 + h*D + ib*QK8_0 + j + 4));
                }
            }
        }
        for (int64_t h = 0; h < ng; ++h) out[h0 + h] = vaddvq_f32(a[h]);
#endif
    }
}

// acc[hh*acc_stride + j] += w[hh*w_stride] * v[j] for the G heads of a group and one f16 V row of
// Dv values (a multiple of 8): each 8 values are converted once, for all heads
inline void mad_group_f16(const ggml_fp16_t * v, int64_t Dv, int64_t G, const float * w, int64_t w_stride,
                          float * acc, size_t acc_stride) {
    for (int64_t j = 0; j < Dv; j += 8) {
#if defined(SPARQ_SIMD_AVX2)
        const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (v + j)));
        for (int64_t hh = 0; hh < G; ++hh) {
            float * a = acc + hh*acc_stride + j;
            _mm256_storeu_ps(a, _mm256_fmadd_ps(vv, _mm256_set1_ps(w[hh*w_stride]), _mm256_loadu_ps(a)));
        }
#else
        const float16x8_t hv = vld1q_f16(f16p(v + j));
        const float32x4_t lo = vcvt_f32_f16(vget_low_f16(hv)), hi = vcvt_high_f32_f16(hv);
        for (int64_t hh = 0; hh < G; ++hh) {
            float * a = acc + hh*acc_stride + j;
            const float32x4_t wb = vdupq_n_f32(w[hh*w_stride]);
            vst1q_f32(a,     vfmaq_f32(vld1q_f32(a),     lo, wb));
            vst1q_f32(a + 4, vfmaq_f32(vld1q_f32(a + 4), hi, wb));
        }
#endif
    }
}

// Step 5's weighted sum over n gathered f16 V rows (row rows[i] at vbase + rows[i]*vstride, Dv
// values, a multiple of 16) for the G heads of a group: acc[hh*acc_stride + j] += sum over i of
// w[hh*w_stride + i] * V[rows[i]][j]. The sums stay in registers: a block of up to 4 heads by
// NJ vectors of values per sweep over the rows (per sum, the same order of operations as one row
// at a time). Returns false where it has no path (then the caller goes one row at a time).
#if defined(__AVX512F__)
template <int NG, int NJ>
inline void mad_rows_blk(const char * vbase, size_t vstride, const int32_t * rows, int64_t n, int64_t j0,
                         const float * w, int64_t w_stride, float * acc, size_t acc_stride) {
    __m512 a[NG][NJ];
    for (int h = 0; h < NG; ++h) for (int u = 0; u < NJ; ++u) a[h][u] = _mm512_loadu_ps(acc + h*acc_stride + j0 + 16*u);
    for (int64_t i = 0; i < n; ++i) {
        const ggml_fp16_t * vr = (const ggml_fp16_t *) (vbase + rows[i]*vstride) + j0;
        __m512 x[NJ];
        for (int u = 0; u < NJ; ++u) x[u] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (vr + 16*u)));
        for (int h = 0; h < NG; ++h) {
            const __m512 wb = _mm512_set1_ps(w[h*w_stride + i]);
            for (int u = 0; u < NJ; ++u) a[h][u] = _mm512_fmadd_ps(x[u], wb, a[h][u]);
        }
    }
    for (int h = 0; h < NG; ++h) for (int u = 0; u < NJ; ++u) _mm512_storeu_ps(acc + h*acc_stride + j0 + 16*u, a[h][u]);
}
constexpr int SPARQ_MAD_NJ = 4;   // 64 values a sweep
#elif defined(SPARQ_SIMD_AVX2)
template <int NG, int NJ>
inline void mad_rows_blk(const char * vbase, size_t vstride, const int32_t * rows, int64_t n, int64_t j0,
                         const float * w, int64_t w_stride, float * acc, size_t acc_stride) {
    __m256 a[NG][2*NJ];
    for (int h = 0; h < NG; ++h) for (int u = 0; u < 2*NJ; ++u) a[h][u] = _mm256_loadu_ps(acc + h*acc_stride + j0 + 8*u);
    for (int64_t i = 0; i < n; ++i) {
        const ggml_fp16_t * vr = (const ggml_fp16_t *) (vbase + rows[i]*vstride) + j0;
        __m256 x[2*NJ];
        for (int u = 0; u < 2*NJ; ++u) x[u] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (vr + 8*u)));
        for (int h = 0; h < NG; ++h) {
            const __m256 wb = _mm256_set1_ps(w[h*w_stride + i]);
            for (int u = 0; u < 2*NJ; ++u) a[h][u] = _mm256_fmadd_ps(x[u], wb, a[h][u]);
        }
    }
    for (int h = 0; h < NG; ++h) for (int u = 0; u < 2*NJ; ++u) _mm256_storeu_ps(acc + h*acc_stride + j0 + 8*u, a[h][u]);
}
constexpr int SPARQ_MAD_NJ = 1;   // 16 values a sweep
#endif

inline bool mad_rows_f16(const char * vbase, size_t vstride, const int32_t * rows, int64_t n, int64_t Dv, int64_t G,
                         const float * w, int64_t w_stride, float * acc, size_t acc_stride) {
#if defined(__AVX512F__) || defined(SPARQ_SIMD_AVX2)
    if (Dv % 16 != 0) return false;
    for (int64_t h0 = 0; h0 < G; h0 += 4) {
        const int ng = (int) std::min<int64_t>(4, G - h0);
        const float * wh = w + h0*w_stride;
        float * ah = acc + h0*acc_stride;
        int64_t j0 = 0;
        for (; j0 + 16*SPARQ_MAD_NJ <= Dv; j0 += 16*SPARQ_MAD_NJ) {
            with_heads(ng, [&](auto nh) { mad_rows_blk<decltype(nh)::value, SPARQ_MAD_NJ>(vbase, vstride, rows, n, j0, wh, w_stride, ah, acc_stride); });
        }
        for (; j0 < Dv; j0 += 16) {
            with_heads(ng, [&](auto nh) { mad_rows_blk<decltype(nh)::value, 1>(vbase, vstride, rows, n, j0, wh, w_stride, ah, acc_stride); });
        }
    }
    return true;
#else
    (void) vbase; (void) vstride; (void) rows; (void) n; (void) Dv; (void) G; (void) w; (void) w_stride; (void) acc; (void) acc_stride;
    return false;
#endif
}

// the same for a Q8_0 V row (Dv a multiple of 32): each 8 values are scaled once, for all heads
inline void mad_group_q8_0(const block_q8_0 * v, int64_t Dv, int64_t G, const float * w, int64_t w_stride,
                           float * acc, size_t acc_stride) {
    for (int64_t ib = 0; ib < Dv/QK8_0; ++ib) {
        const float dv = GGML_CPU_FP16_TO_FP32(v[ib].d);
        for (int64_t j = 0; j < QK8_0; j += 8) {
#if defined(SPARQ_SIMD_AVX2)
            const __m256 vv = _mm256_mul_ps(_mm256_set1_ps(dv), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (v[ib].qs + j)))));
            for (int64_t hh = 0; hh < G; ++hh) {
                float * a = acc + hh*acc_stride + ib*QK8_0 + j;
                _mm256_storeu_ps(a, _mm256_fmadd_ps(vv, _mm256_set1_ps(w[hh*w_stride]), _mm256_loadu_ps(a)));
            }
#else
            const int16x8_t x = vmovl_s8(vld1_s8(v[ib].qs + j));
            const float32x4_t lo = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(x))), dv);
            const float32x4_t hi = vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(x)), dv);
            for (int64_t hh = 0; hh < G; ++hh) {
                float * a = acc + hh*acc_stride + ib*QK8_0 + j;
                const float32x4_t wb = vdupq_n_f32(w[hh*w_stride]);
                vst1q_f32(a,     vfmaq_f32(vld1q_f32(a),     lo, wb));
                vst1q_f32(a + 4, vfmaq_f32(vld1q_f32(a + 4), hi, wb));
            }
#endif
        }
    }
}
#endif // SPARQ_SIMD

} // namespace ggml_sparq
