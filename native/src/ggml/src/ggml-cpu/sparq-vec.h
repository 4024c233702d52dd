// sparq-cpp: the inner loops of the CPU kernel (sparq.cpp): the mask scan, the selection's
// histogram and compare passes, step 2's approximate logits, the dot products of a K row with a
// group's queries, and the accumulation of V rows into a group's sums. Each loop is written once,
// over three small sets of per-architecture primitives (x86 AVX-512 or AVX2 with F16C and FMA,
// AArch64 NEON); a build without them runs the plain loops (sparq.cpp's, and the scans' here):
//   lanes  f32 vectors at the build's widest width (16 lanes with AVX-512, 8 with AVX2, 4 with
//          NEON), for the loops whose lanes are independent (step 2: a lane is a position; the V
//          sums: a lane is a value), so the width changes no result. On x86 the type, width,
//          load, store, set1, mul and fused multiply-add are upstream's (simd-mappings.h,
//          GGML_F32_VEC); the f16 and int8 loads, max, the -inf test and select are ours, as
//          simd-mappings.h has no macro for them at that width (with AVX512-FP16 it maps f16 to
//          native half vectors). On AArch64 every primitive is ours: with SVE, simd-mappings.h
//          maps GGML_F32_VEC to sizeless SVE vectors, which cannot be held in arrays.
//   cmp    compares of int32 or f16 lanes as bits of a word (B bits a lane: a movemask on x86, a
//          narrowing shift on NEON), for the scans that look for a few positions among many.
//   v8     steps of 8 values for the dot products (sums across lanes): the order of the sum is
//          the one the accuracy levels were measured with (8 lanes on x86, AVX-512 builds too;
//          4 lanes on NEON), since the chosen rows of later tokens depend on these outputs.
// Every path computes in fp32 (f16 and int8 values converted on the fly), in the same order of
// operations per lane where it matters for the selection (the logits are one fused multiply-add
// of the accumulated dot and tau's scale onto the mask), so they select what the plain path and
// the reference select.
#pragma once

#include "sparq-impl.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define SPARQ_SIMD_AVX2 1
#if defined(__AVX512F__)
#define SPARQ_SIMD_AVX512 1
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define SPARQ_SIMD_NEON 1
#endif
#if defined(SPARQ_SIMD_AVX2) || defined(SPARQ_SIMD_NEON)
#define SPARQ_SIMD 1  // step2_range, dot_group_*, mad_group_* and mad_rows_f16 exist (f16/int8 K^T, f16/q8_0 K and V)
#endif
#if defined(__AVX2__) || defined(SPARQ_SIMD_NEON)
#define SPARQ_SIMD_CMP 1  // the cmp primitives exist (they need AVX2's integer compares alone)
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

#if defined(SPARQ_SIMD)
namespace lanes {
#if defined(SPARQ_SIMD_AVX2)
using vf = GGML_F32_VEC;
constexpr int N = GGML_F32_EPR;
inline vf zero()                 { return GGML_F32_VEC_ZERO; }
inline vf set1(float x)          { return GGML_F32_VEC_SET1(x); }
inline vf load(const float * p)  { return GGML_F32_VEC_LOAD(p); }
inline void store(float * p, vf x) { GGML_F32_VEC_STORE(p, x); }
inline vf fma(vf a, vf b, vf c)  { return GGML_F32_VEC_FMA(a, b, c); }  // a + b*c, one rounding
inline vf mul(vf a, vf b)        { return GGML_F32_VEC_MUL(a, b); }
#endif
#if defined(SPARQ_SIMD_AVX512)
static_assert(N == 16, "simd-mappings.h: 16 lanes with AVX-512");
using vm = __mmask16;
using vi = __m512i;
inline vf load_f16(const ggml_fp16_t * p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) p)); }
inline vi load_i8_i32(const int8_t * p)  { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) p)); }
inline vf to_f32(vi x)                    { return _mm512_cvtepi32_ps(x); }
inline vf pow2(vi e) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(127)), 23)); }
inline vf max(vf a, vf b)                 { return _mm512_max_ps(a, b); }
inline float hmax(vf a)                   { return _mm512_reduce_max_ps(a); }
inline vm is_ninf(vf a)                   { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ); }
inline vf select(vm m, vf a, vf b)        { return _mm512_mask_mov_ps(b, m, a); }  // m ? a : b
#elif defined(SPARQ_SIMD_AVX2)
static_assert(N == 8, "simd-mappings.h: 8 lanes with AVX");
using vm = __m256;
using vi = __m256i;
inline vf load_f16(const ggml_fp16_t * p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p)); }
inline vi load_i8_i32(const int8_t * p)  { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) p)); }
inline vf to_f32(vi x)                    { return _mm256_cvtepi32_ps(x); }
inline vf pow2(vi e) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23)); }
inline vf max(vf a, vf b)                 { return _mm256_max_ps(a, b); }
inline float hmax(vf a) {
    float t[8];
    _mm256_storeu_ps(t, a);
    return *std::max_element(t, t + 8);
}
inline vm is_ninf(vf a)                   { return _mm256_cmp_ps(a, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ); }
inline vf select(vm m, vf a, vf b)        { return _mm256_blendv_ps(b, a, m); }
#else
using vf = float32x4_t;
using vm = uint32x4_t;
using vi = int32x4_t;
constexpr int N = 4;
inline vf zero()                 { return vdupq_n_f32(0.0f); }
inline vf set1(float x)          { return vdupq_n_f32(x); }
inline vf load(const float * p)  { return vld1q_f32(p); }
inline void store(float * p, vf x) { vst1q_f32(p, x); }
inline vf fma(vf a, vf b, vf c)  { return vfmaq_f32(a, b, c); }
inline vf mul(vf a, vf b)        { return vmulq_f32(a, b); }
inline vf load_f16(const ggml_fp16_t * p) { return vcvt_f32_f16(vld1_f16((const float16_t *) p)); }
inline vi load_i8_i32(const int8_t * p) {
    int32_t w;
    memcpy(&w, p, 4);
    return vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(w)))));
}
inline vf to_f32(vi x)                    { return vcvtq_f32_s32(x); }
inline vf pow2(vi e)                      { return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(e, vdupq_n_s32(127)), 23)); }
inline vf max(vf a, vf b)                 { return vmaxq_f32(a, b); }
inline float hmax(vf a)                   { return vmaxvq_f32(a); }
inline vm is_ninf(vf a)                   { return vceqq_f32(a, vdupq_n_f32(-INFINITY)); }
inline vf select(vm m, vf a, vf b)        { return vbslq_f32(m, a, b); }
#endif
inline vf load_i8(const int8_t * p) { return to_f32(load_i8_i32(p)); }
// 2^e for N int8 exponents: the floats whose exponent field is e + 127
inline vf pow2_i8(const int8_t * p) { return pow2(load_i8_i32(p)); }
} // namespace lanes

namespace v8 {
#if defined(SPARQ_SIMD_AVX2)
using acc = __m256;
using vk = __m256;  // 8 values of a K row, in f32
inline acc zero() { return _mm256_setzero_ps(); }
inline vk load_f16(const ggml_fp16_t * p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p)); }
inline vk load_i8(const int8_t * p, float d) {  // d times the 8 values
    return _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) p))));
}
inline acc fma(acc a, vk k, const float * q) { return _mm256_fmadd_ps(k, _mm256_loadu_ps(q), a); }  // a + k*q[0..8)
inline float sum(acc a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}
#else
using acc = float32x4_t;
struct vk { float32x4_t lo, hi; };
inline acc zero() { return vdupq_n_f32(0.0f); }
inline vk load_f16(const ggml_fp16_t * p) {
    const float16x8_t h = vld1q_f16((const float16_t *) p);
    return { vcvt_f32_f16(vget_low_f16(h)), vcvt_high_f32_f16(h) };
}
inline vk load_i8(const int8_t * p, float d) {
    const int16x8_t w = vmovl_s8(vld1_s8(p));
    return { vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), d), vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(w)), d) };
}
inline acc fma(acc a, vk k, const float * q) { return vfmaq_f32(vfmaq_f32(a, k.lo, vld1q_f32(q)), k.hi, vld1q_f32(q + 4)); }
inline float sum(acc a) { return vaddvq_f32(a); }
#endif
} // namespace v8
#endif // SPARQ_SIMD

#if defined(SPARQ_SIMD_CMP)
namespace cmp {
// W int32 lanes a step, B bits of the result per lane; F16 (and F32) mask positions a step, and
// their bits per position. lane(m): the lowest lane set in m; next(m): m without that lane.
#if defined(__AVX2__)
constexpr int W = 8, B = 1, W_F16 = 16, B_F16 = 2, W_F32 = 8, B_F32 = 1;
inline __m256i ld(const void * p) { return _mm256_loadu_si256((const __m256i *) p); }
inline uint64_t bits(__m256i m) { return (uint32_t) _mm256_movemask_ps(_mm256_castsi256_ps(m)); }
inline uint64_t gt(const int32_t * p, int32_t t) { return bits(_mm256_cmpgt_epi32(ld(p), _mm256_set1_epi32(t))); }
inline bool any_eq(const int32_t * p, int32_t t) { return bits(_mm256_cmpeq_epi32(ld(p), _mm256_set1_epi32(t))) != 0; }
inline uint64_t in_range(const int32_t * p, int32_t lo, int32_t hi) {  // lo < x <= hi
    const __m256i u = ld(p);
    return bits(_mm256_andnot_si256(_mm256_cmpgt_epi32(u, _mm256_set1_epi32(hi)), _mm256_cmpgt_epi32(u, _mm256_set1_epi32(lo))));
}
inline uint64_t visible_f16(const uint16_t * p) {  // not -inf (0xFC00)
    return (uint32_t) ~_mm256_movemask_epi8(_mm256_cmpeq_epi16(ld(p), _mm256_set1_epi16((short) 0xFC00)));
}
inline uint64_t visible_f32(const float * p) {     // not -inf (0xFF800000)
    return ~bits(_mm256_cmpeq_epi32(ld(p), _mm256_set1_epi32((int) 0xFF800000u))) & 0xFFu;
}
#else
constexpr int W = 4, B = 16, W_F16 = 8, B_F16 = 8, W_F32 = 4, B_F32 = 16;
// a NEON compare result as bits of a 64-bit word: 8 bits per 16-bit lane, 16 per 32-bit lane
inline uint64_t bits16(uint16x8_t m) { return vget_lane_u64(vreinterpret_u64_u8(vshrn_n_u16(m, 4)), 0); }
inline uint64_t bits(uint32x4_t m)   { return vget_lane_u64(vreinterpret_u64_u16(vmovn_u32(m)), 0); }
inline uint64_t gt(const int32_t * p, int32_t t) { return bits(vcgtq_s32(vld1q_s32(p), vdupq_n_s32(t))); }
inline bool any_eq(const int32_t * p, int32_t t) { return vmaxvq_u32(vceqq_s32(vld1q_s32(p), vdupq_n_s32(t))) != 0; }
inline uint64_t in_range(const int32_t * p, int32_t lo, int32_t hi) {
    const int32x4_t u = vld1q_s32(p);
    return bits(vandq_u32(vcgtq_s32(u, vdupq_n_s32(lo)), vcleq_s32(u, vdupq_n_s32(hi))));
}
inline uint64_t visible_f16(const uint16_t * p) { return ~bits16(vceqq_u16(vld1q_u16(p), vdupq_n_u16(0xFC00))); }
inline uint64_t visible_f32(const float * p)    { return ~bits(vceqq_u32(vld1q_u32((const uint32_t *) p), vdupq_n_u32(0xFF800000u))); }
#endif
inline int lane(uint64_t m) { return __builtin_ctzll(m)/B; }
inline uint64_t next(uint64_t m) {
    if constexpr (B == 1) return m & (m - 1);
    return m & ~(((uint64_t(1) << B) - 1) << (__builtin_ctzll(m)/B*B));
}
} // namespace cmp
#endif // SPARQ_SIMD_CMP

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
#if defined(SPARQ_SIMD_CMP)
    for (; p + cmp::W <= hi; p += cmp::W) {
        for (uint64_t m = cmp::in_range(ibits + p, lo_b, hi_b); m; m = cmp::next(m)) cand[nc++] = (uint32_t) ibits[p + cmp::lane(m)];
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
#if defined(SPARQ_SIMD_CMP)
    for (; p + cmp::W <= hi; p += cmp::W) {
        if (ties > 0 && cmp::any_eq(ibits + p, T)) {
            for (int e = 0; e < cmp::W; ++e) {
                if (ibits[p + e] > T || (ibits[p + e] == T && ties-- > 0)) sel[n++] = (int32_t) (p + e);
            }
            continue;
        }
        for (uint64_t m = cmp::gt(ibits + p, T); m; m = cmp::next(m)) sel[n++] = (int32_t) (p + cmp::lane(m));
    }
#endif
    for (; p < hi; ++p) {
        if (ibits[p] > T || (ibits[p] == T && ties-- > 0)) sel[n++] = (int32_t) p;
    }
    return n;
}

#if defined(SPARQ_SIMD_CMP)
// the visible positions among a step's, from p on, whose bits vis has (B bits each)
template <int B> inline void count_visible(uint64_t vis, int64_t p, int32_t & n_vis, int32_t & p_lo, int32_t & p_hi) {
    if (!vis) return;
    if (n_vis == 0) p_lo = (int32_t) (p + __builtin_ctzll(vis)/B);
    p_hi = (int32_t) (p + (63 - __builtin_clzll(vis))/B + 1);
    n_vis += __builtin_popcountll(vis)/B;
}
#endif

// visible positions of a mask row: count, first, one past the last (p_lo = S, p_hi = 0 if none)
inline void scan_visible(const ggml_tensor * mask, const char * mrow, int64_t S, int32_t & n_vis, int32_t & p_lo, int32_t & p_hi) {
    n_vis = 0; p_lo = (int32_t) S; p_hi = 0;
    int64_t p = 0;
#if defined(SPARQ_SIMD_CMP)
    if (mask->type == GGML_TYPE_F16) {
        for (; p + cmp::W_F16 <= S; p += cmp::W_F16) {
            count_visible<cmp::B_F16>(cmp::visible_f16((const uint16_t *) mrow + p), p, n_vis, p_lo, p_hi);
        }
    } else {
        for (; p + cmp::W_F32 <= S; p += cmp::W_F32) {
            count_visible<cmp::B_F32>(cmp::visible_f32((const float *) mrow + p), p, n_vis, p_lo, p_hi);
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

#if defined(SPARQ_SIMD)
// Step 2 for NG (<= 4) heads of a group over positions [p0, p0 + n), n a multiple of N*NV: the
// NG*NV accumulators (NV vectors of positions per head) stay in registers across the r rows of
// K^T (f16, or I8 times 2^ex[p], converted on the fly; rows[jj] is row i1[jj] at position 0,
// qs[jj*NG + h] the query value it multiplies), then logits = acc*ascale + mask, -inf where
// masked; running max per head; gs = -1 where masked, 0 elsewhere.
template <int NG, int NV, bool I8>
inline void step2_lanes(int64_t p0, int64_t n, int r, const void * const * rows, const int8_t * ex, const float * qs,
                        const float * asc, const ggml_tensor * mask, const char * mrow,
                        float * const * Lh, float * gs, float * lmax) {
    using namespace lanes;
    vf vmax[NG];
    for (int h = 0; h < NG; ++h) vmax[h] = set1(lmax[h]);
    const vf ninf = set1(-INFINITY), neg1 = set1(-1.0f);
    for (int64_t i = 0; i < n; i += N*NV) {
        const int64_t p = p0 + i;
        vf a[NG][NV];
        for (int h = 0; h < NG; ++h) for (int u = 0; u < NV; ++u) a[h][u] = zero();
        for (int jj = 0; jj < r; ++jj) {
            vf x[NV];
            for (int u = 0; u < NV; ++u) {
                x[u] = I8 ? load_i8((const int8_t *) rows[jj] + p + N*u) : load_f16((const ggml_fp16_t *) rows[jj] + p + N*u);
            }
            for (int h = 0; h < NG; ++h) {
                const vf qb = set1(qs[jj*NG + h]);
                for (int u = 0; u < NV; ++u) a[h][u] = lanes::fma(a[h][u], x[u], qb);
            }
        }
        for (int u = 0; u < NV; ++u) {
            const int64_t pu = p + N*u;
            const vf m = mask->type == GGML_TYPE_F16 ? load_f16((const ggml_fp16_t *) mrow + pu) : load((const float *) mrow + pu);
            const vm is_masked = is_ninf(m);
            store(gs + pu, select(is_masked, neg1, zero()));
            if (I8) {
                const vf sc = pow2_i8(ex + pu);
                for (int h = 0; h < NG; ++h) a[h][u] = mul(a[h][u], sc);
            }
            for (int h = 0; h < NG; ++h) {
                const vf x = select(is_masked, ninf, lanes::fma(m, a[h][u], set1(asc[h])));
                store(Lh[h] + pu, x);
                vmax[h] = lanes::max(vmax[h], x);
            }
        }
    }
    for (int h = 0; h < NG; ++h) lmax[h] = std::max(lmax[h], hmax(vmax[h]));
}

// Step 2 as step2_lanes for single positions (what is left below a vector's width), in the same
// operations per position
template <int NG, bool I8>
inline void step2_each(int64_t p0, int64_t n, int r, const void * const * rows, const int8_t * ex, const float * qs,
                       const float * asc, const ggml_tensor * mask, const char * mrow,
                       float * const * Lh, float * gs, float * lmax) {
    for (int64_t p = p0; p < p0 + n; ++p) {
        float a[NG] = {};
        for (int jj = 0; jj < r; ++jj) {
            const float x = I8 ? (float) ((const int8_t *) rows[jj])[p] : GGML_CPU_FP16_TO_FP32(((const ggml_fp16_t *) rows[jj])[p]);
            for (int h = 0; h < NG; ++h) a[h] = std::fma(x, qs[jj*NG + h], a[h]);
        }
        const float m = mask_at(mask, mrow, p);
        gs[p] = m == -INFINITY ? -1.0f : 0.0f;
        float sc = 1.0f;
        if (I8) {
            const uint32_t e = (uint32_t) (ex[p] + 127) << 23;
            memcpy(&sc, &e, sizeof(sc));
        }
        for (int h = 0; h < NG; ++h) {
            const float x = m == -INFINITY ? -INFINITY : std::fma(I8 ? a[h]*sc : a[h], asc[h], m);
            Lh[h][p] = x;
            lmax[h] = std::max(lmax[h], x);
        }
    }
}

// Step 2 for NG (<= 4) heads of a group over positions [p0, p0 + n), n a multiple of 8: wide
// blocks, then single vectors, then single positions (with AVX-512, at most 8); rows[jj] is K^T
// row i1[jj] (f16, or I8 with exponents ex) at position 0, qs[jj*NG + h] the query value it
// multiplies, asc[h] the heads' scales; writes the logits (-inf where masked) to Lh[h], gs = -1
// where masked and 0 elsewhere, and raises lmax[h] to the logits' max.
template <int NG, bool I8>
inline void step2_range(int64_t p0, int64_t n, int r, const void * const * rows, const int8_t * ex, const float * qs,
                        const float * asc, const ggml_tensor * mask, const char * mrow,
                        float * const * Lh, float * gs, float * lmax) {
    constexpr int N = lanes::N;
    // per head, 4 (NG <= 2) or 2 blocks of max(8, N) positions in registers
    constexpr int NV = (NG <= 2 ? 4 : 2) * (N < 8 ? 8/N : 1);
    const int64_t nw = n - n % (N*NV), n1 = n - n % N;
    step2_lanes<NG, NV, I8>(p0, nw, r, rows, ex, qs, asc, mask, mrow, Lh, gs, lmax);
    step2_lanes<NG, 1, I8>(p0 + nw, n1 - nw, r, rows, ex, qs, asc, mask, mrow, Lh, gs, lmax);
    step2_each<NG, I8>(p0 + n1, n - n1, r, rows, ex, qs, asc, mask, mrow, Lh, gs, lmax);
}

// dots of one K row (f16, or q8_0 blocks) with NG (<= 4) f32 queries (q: NG rows of D), D a
// multiple of 8 (f16) or 32 (q8_0); each 8 values of K are converted once and used by every head
template <int NG>
inline void dot_heads_f16(const ggml_fp16_t * kr, const float * q, int64_t D, float * out) {
    v8::acc a[NG];
    for (int h = 0; h < NG; ++h) a[h] = v8::zero();
    for (int64_t j = 0; j < D; j += 8) {
        const v8::vk kv = v8::load_f16(kr + j);
        for (int h = 0; h < NG; ++h) a[h] = v8::fma(a[h], kv, q + h*D + j);
    }
    for (int h = 0; h < NG; ++h) out[h] = v8::sum(a[h]);
}

template <int NG>
inline void dot_heads_q8_0(const block_q8_0 * kr, const float * q, int64_t D, float * out) {
    v8::acc a[NG];
    for (int h = 0; h < NG; ++h) a[h] = v8::zero();
    for (int64_t ib = 0; ib < D/QK8_0; ++ib) {
        const float d = GGML_CPU_FP16_TO_FP32(kr[ib].d);
        for (int64_t j = 0; j < QK8_0; j += 8) {
            const v8::vk kv = v8::load_i8(kr[ib].qs + j, d);
            for (int h = 0; h < NG; ++h) a[h] = v8::fma(a[h], kv, q + h*D + ib*QK8_0 + j);
        }
    }
    for (int h = 0; h < NG; ++h) out[h] = v8::sum(a[h]);
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
        with_heads(G - h0, [&](auto nh) { dot_heads_q8_0<decltype(nh)::value>(kr, q + h0*D, D, out + h0); });
    }
}

// acc[hh*acc_stride + j] += w[hh*w_stride] * v[j] for the G heads of a group and one f16 V row of
// Dv values (a multiple of 8): each vector of values is converted once, for all heads
inline void mad_group_f16(const ggml_fp16_t * v, int64_t Dv, int64_t G, const float * w, int64_t w_stride,
                          float * acc, size_t acc_stride) {
    using namespace lanes;
    int64_t j = 0;
    for (; j + N <= Dv; j += N) {
        const vf vv = load_f16(v + j);
        for (int64_t hh = 0; hh < G; ++hh) {
            float * a = acc + hh*acc_stride + j;
            store(a, lanes::fma(load(a), vv, set1(w[hh*w_stride])));
        }
    }
    for (; j < Dv; ++j) {
        const float x = GGML_CPU_FP16_TO_FP32(v[j]);
        for (int64_t hh = 0; hh < G; ++hh) acc[hh*acc_stride + j] = std::fma(x, w[hh*w_stride], acc[hh*acc_stride + j]);
    }
}

// the same for a Q8_0 V row (Dv a multiple of 32): each vector of values is scaled once, for all heads
inline void mad_group_q8_0(const block_q8_0 * v, int64_t Dv, int64_t G, const float * w, int64_t w_stride,
                           float * acc, size_t acc_stride) {
    using namespace lanes;
    static_assert(QK8_0 % N == 0, "a q8_0 block is whole vectors");
    for (int64_t ib = 0; ib < Dv/QK8_0; ++ib) {
        const vf d = set1(GGML_CPU_FP16_TO_FP32(v[ib].d));
        for (int64_t j = 0; j < QK8_0; j += N) {
            const vf vv = mul(d, load_i8(v[ib].qs + j));
            for (int64_t hh = 0; hh < G; ++hh) {
                float * a = acc + hh*acc_stride + ib*QK8_0 + j;
                store(a, lanes::fma(load(a), vv, set1(w[hh*w_stride])));
            }
        }
    }
}

// Step 5's weighted sum over n gathered f16 V rows (row rows[i] at vbase + rows[i]*vstride) for
// a block of NG (<= 4) heads and the NJ vectors of values from j0: the NG*NJ sums stay in
// registers for the sweep over the rows (per sum, the same order of operations as one row at a time)
template <int NG, int NJ>
inline void mad_rows_blk(const char * vbase, size_t vstride, const int32_t * rows, int64_t n, int64_t j0,
                         const float * w, int64_t w_stride, float * acc, size_t acc_stride) {
    using namespace lanes;
    vf a[NG][NJ];
    for (int h = 0; h < NG; ++h) for (int u = 0; u < NJ; ++u) a[h][u] = load(acc + h*acc_stride + j0 + N*u);
    for (int64_t i = 0; i < n; ++i) {
        const ggml_fp16_t * vr = (const ggml_fp16_t *) (vbase + rows[i]*vstride) + j0;
        vf x[NJ];
        for (int u = 0; u < NJ; ++u) x[u] = load_f16(vr + N*u);
        for (int h = 0; h < NG; ++h) {
            const vf wb = set1(w[h*w_stride + i]);
            for (int u = 0; u < NJ; ++u) a[h][u] = lanes::fma(a[h][u], x[u], wb);
        }
    }
    for (int h = 0; h < NG; ++h) for (int u = 0; u < NJ; ++u) store(acc + h*acc_stride + j0 + N*u, a[h][u]);
}

// values a sweep of mad_rows_blk (measured: 64 with AVX-512's 32 registers, 16 with AVX2's 16)
constexpr int SPARQ_MAD_VALUES = lanes::N == 16 ? 64 : 16;

// Step 5's weighted sum over n gathered f16 V rows (Dv values, a multiple of 16) for the G heads
// of a group: acc[hh*acc_stride + j] += sum over i of w[hh*w_stride + i] * V[rows[i]][j], in
// blocks of up to 4 heads by SPARQ_MAD_VALUES values. Returns false where Dv is not a multiple
// of 16 (then the caller goes one row at a time).
inline bool mad_rows_f16(const char * vbase, size_t vstride, const int32_t * rows, int64_t n, int64_t Dv, int64_t G,
                         const float * w, int64_t w_stride, float * acc, size_t acc_stride) {
    constexpr int N = lanes::N;
    if (Dv % 16 != 0) return false;
    for (int64_t h0 = 0; h0 < G; h0 += 4) {
        const float * wh = w + h0*w_stride;
        float * ah = acc + h0*acc_stride;
        int64_t j0 = 0;
        for (; j0 + SPARQ_MAD_VALUES <= Dv; j0 += SPARQ_MAD_VALUES) {
            with_heads(G - h0, [&](auto nh) { mad_rows_blk<decltype(nh)::value, SPARQ_MAD_VALUES/N>(vbase, vstride, rows, n, j0, wh, w_stride, ah, acc_stride); });
        }
        for (; j0 < Dv; j0 += 16) {
            with_heads(G - h0, [&](auto nh) { mad_rows_blk<decltype(nh)::value, 16/N>(vbase, vstride, rows, n, j0, wh, w_stride, ah, acc_stride); });
        }
    }
    return true;
}
#endif // SPARQ_SIMD

} // namespace ggml_sparq
