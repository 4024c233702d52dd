// sparq-cpp: CPU kernel of GGML_OP_SPARQ_ATTN. Semantics: sparq.h.
//
// Fast path, all threads, phases separated by barriers:
//   A  per item (query row x KV head): visible count and range, local window, i1, tau scales;
//      items with k >= visible take every visible row (dense) and skip B-E
//   B  positions split across threads: approximate logits from r rows of K^T (AVX2: in
//      registers, f16 converted on the fly), per-thread max per head
//   D1 positions split: s_hat's numerators exp(L - max) in place of the logits (the only
//      exponentials of steps 2-4), per-thread denominators; one head per group: the scores
//   D2 (G > 1) positions split: the group's summed, normalised score; +inf on the local window
//   E  per item: O(S) radix selection of the top k, in position order
//   F  selected rows split across threads: exact attention on K/V rows, softmax partials per
//      thread (max, sum, weighted V, alpha's share)
//   G  per item and head: merge the partials, alpha mix with the mean of V
// Reference path (params->use_ref): a plain double-precision implementation on one thread that
// reads K rows instead of K^T, for test-backend-ops to compare against.

#include "sparq.h"

#define GGML_COMMON_DECL_CPP
#include "ggml-common.h"
#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "vec.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

constexpr int64_t SPARQ_BLK   = 256;  // positions per block in step 2
constexpr int     SPARQ_HBITS = 12;   // radix-select histogram: at most the top 12 bits of the score
constexpr int64_t SPARQ_PF    = 8;    // rows prefetched ahead in the gather of step 5

inline void prefetch_row(const char * p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) {
        __builtin_prefetch(p + o, 0, 3);
    }
}

struct sparq_dims {
    int64_t D, Dv, n_kv, n_batch, n_head, n_head_kv, G, ne3, n_items;
    int     r, k_top, l, flags;
    float   scale;
};

sparq_dims get_dims(const ggml_tensor * dst) {
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

// what phase A leaves for the others, per item
struct item_info {
    int32_t n_vis;    // visible positions
    int32_t dense;    // every visible row is selected, alpha = 1
    int32_t p_lo;     // first visible position
    int32_t p_hi;     // one past the last visible position
    int32_t t_local;  // visible positions >= t_local form the local window
    int32_t n_sel;    // selected positions (written by A for dense items, by E otherwise)
};

size_t align16(size_t n) { return (n + 15) & ~size_t(15); }

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
    o.part_stride = 3 + d.Dv;
    o.part        = take((size_t) nth * I * G * o.part_stride);
    // per thread: step-2 row block + G accumulators + mask block, q rows in f32, V row in f32,
    // the candidate list of the selection, the step-5 scores
    o.per_thr     = align16(SPARQ_BLK * (G + 2) + G * d.D + d.Dv + S + G * (S / nth + 32));
    o.thr         = take((size_t) nth * o.per_thr);
    o.total       = off;
    return o;
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


// ---------------------------------------------------------------------------------------------
// reference path: plain, double precision, one thread, K rows (not K^T)
// ---------------------------------------------------------------------------------------------

double load_elem(const ggml_tensor * t, const char * p) {
    return t->type == GGML_TYPE_F16 ? (double) GGML_CPU_FP16_TO_FP32(*(const ggml_fp16_t *) p)
                                    : (double) *(const float *) p;
}

// one K or V row (F16, F32 or Q8_0) in f32
void load_row(const ggml_tensor * t, int64_t p, int64_t g, int64_t s, std::vector<float> & row) {
    const char * src = (const char *) t->data + p*t->nb[1] + g*t->nb[2] + s*t->nb[3];
    row.resize(t->ne[0]);
    if (t->type == GGML_TYPE_F32) {
        memcpy(row.data(), src, t->ne[0]*sizeof(float));
    } else {
        ggml_get_type_traits(t->type)->to_float(src, row.data(), t->ne[0]);
    }
}

void sparq_attn_ref(const ggml_tensor * dst) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    const ggml_tensor * mask = dst->src[3];
    const ggml_tensor * kt = dst->src[4];
    const ggml_tensor * vmean = dst->src[5];
    const sparq_dims d = get_dims(dst);
    const bool realloc = d.flags & GGML_SPARQ_REALLOC;
    const bool no_tau  = d.flags & GGML_SPARQ_NO_TAU;

    auto qv = [&](int64_t j, int64_t b, int64_t h, int64_t s) {
        return (double) *(const float *) ((const char *) q->data + j*q->nb[0] + b*q->nb[1] + h*q->nb[2] + s*q->nb[3]);
    };
    // step 2 reads K^T (component j of position p); steps 5-6 read whole K and V rows
    auto ktv = [&](int64_t j, int64_t p, int64_t g, int64_t s) {
        return load_elem(kt, (const char *) kt->data + p*kt->nb[0] + j*kt->nb[1] + g*kt->nb[2] + s*kt->nb[3]);
    };
    std::vector<float> krow, vrow;

    for (int64_t s = 0; s < d.ne3; ++s)
    for (int64_t b = 0; b < d.n_batch; ++b)
    for (int64_t g = 0; g < d.n_head_kv; ++g) {
        const char * mrow = mask_row(mask, b, s);
        std::vector<int64_t> vis;
        for (int64_t p = 0; p < d.n_kv; ++p) {
            if (mask_at(mask, mrow, p) != -INFINITY) {
                vis.push_back(p);
            }
        }
        const int64_t n_vis = (int64_t) vis.size();
        std::vector<int64_t> sel;
        std::vector<double> alpha(d.G, 1.0);
        std::vector<std::vector<double>> shat(d.G, std::vector<double>(n_vis, 0.0));
        if (n_vis <= d.k_top) {
            sel = vis;
        } else {
            std::vector<double> a(d.D, 0.0);
            for (int64_t hh = 0; hh < d.G; ++hh)
                for (int64_t j = 0; j < d.D; ++j) a[j] += std::fabs(qv(j, b, g*d.G + hh, s));
            std::vector<int64_t> order(d.D);
            std::iota(order.begin(), order.end(), 0);
            std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return a[x] > a[y]; });
            order.resize(d.r);

            std::vector<double> gsum(n_vis, 0.0);
            for (int64_t hh = 0; hh < d.G; ++hh) {
                const int64_t h = g*d.G + hh;
                double l1 = 0, l1s = 0;
                for (int64_t j = 0; j < d.D; ++j) l1 += std::fabs(qv(j, b, h, s));
                for (int64_t j : order) l1s += std::fabs(qv(j, b, h, s));
                const double ratio = l1 > 0 && l1s > 0 ? l1s / l1 : 1.0;
                const double sc = no_tau ? d.scale : d.scale / std::sqrt(ratio);
                std::vector<double> lg(n_vis);
                double mx = -INFINITY;
                for (int64_t i = 0; i < n_vis; ++i) {
                    double dot = 0;
                    for (int64_t j : order) dot += qv(j, b, h, s) * ktv(j, vis[i], g, s);
                    lg[i] = dot * sc + mask_at(mask, mrow, vis[i]);
                    mx = std::max(mx, lg[i]);
                }
                double z = 0;
                for (int64_t i = 0; i < n_vis; ++i) z += std::exp(lg[i] - mx);
                for (int64_t i = 0; i < n_vis; ++i) {
                    const double e = std::exp(lg[i] - mx);  // numerators below FLT_MIN count as 0
                    shat[hh][i] = e < FLT_MIN ? 0.0 : e / z;
                    gsum[i] += shat[hh][i];
                }
            }
            // local window: the last l visible positions; then the best of the rest
            std::vector<char> chosen(n_vis, 0);
            for (int64_t i = std::max<int64_t>(0, n_vis - d.l); i < n_vis; ++i) chosen[i] = 1;
            std::vector<int64_t> rest;
            for (int64_t i = 0; i < n_vis - d.l; ++i) rest.push_back(i);
            std::stable_sort(rest.begin(), rest.end(), [&](int64_t x, int64_t y) { return gsum[x] > gsum[y]; });
            for (int64_t i = 0; i < d.k_top - d.l; ++i) chosen[rest[i]] = 1;
            for (int64_t hh = 0; hh < d.G; ++hh) {
                alpha[hh] = 0;
                for (int64_t i = 0; i < n_vis; ++i) if (chosen[i]) alpha[hh] += shat[hh][i];
            }
            for (int64_t i = 0; i < n_vis; ++i) if (chosen[i]) sel.push_back(vis[i]);
        }
        for (int64_t hh = 0; hh < d.G; ++hh) {
            const int64_t h = g*d.G + hh;
            float * out = (float *) ((char *) dst->data + h*dst->nb[1] + b*dst->nb[2] + s*dst->nb[3]);
            std::vector<double> lg(sel.size()), y(d.Dv, 0.0);
            double mx = -INFINITY, z = 0;
            for (size_t i = 0; i < sel.size(); ++i) {
                load_row(k, sel[i], g, s, krow);
                double dot = 0;
                for (int64_t j = 0; j < d.D; ++j) dot += qv(j, b, h, s) * krow[j];
                lg[i] = dot * d.scale + mask_at(mask, mrow, sel[i]);
                mx = std::max(mx, lg[i]);
            }
            for (size_t i = 0; i < sel.size(); ++i) {
                const double w = std::exp(lg[i] - mx);
                z += w;
                load_row(v, sel[i], g, s, vrow);
                for (int64_t j = 0; j < d.Dv; ++j) y[j] += w * vrow[j];
            }
            const float * vm = realloc ? (const float *) ((const char *) vmean->data + g*vmean->nb[1] + b*vmean->nb[2] + s*vmean->nb[3]) : nullptr;
            for (int64_t j = 0; j < d.Dv; ++j) {
                const double ys = z > 0 ? y[j] / z : 0.0;
                out[j] = (float) (realloc && !sel.empty() ? alpha[hh]*ys + (1.0 - alpha[hh])*vm[j] : ys);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// fast path
// ---------------------------------------------------------------------------------------------

// split [lo, hi) into nth pieces aligned to 16 positions; returns thread ith's piece
inline void split_range(int64_t lo, int64_t hi, int ith, int nth, int64_t & c0, int64_t & c1) {
    const int64_t n = hi - lo;
    const int64_t chunk = ((n + nth - 1) / nth + 15) & ~int64_t(15);
    c0 = std::min(hi, lo + ith*chunk);
    c1 = std::min(hi, c0 + chunk);
}

// Histogram of the top hbits bits of the scores gs[c0, c1) that are >= 0 (or +inf): their bit
// patterns order like the values. Each thread counts its own positions (phase D).
void score_histogram(const float * gs, int64_t c0, int64_t c1, int hbits, int32_t * hist) {
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
int32_t select_top_k(const float * gs, int64_t lo, int64_t hi, int32_t k, int32_t * sel,
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
void scan_visible(const ggml_tensor * mask, const char * mrow, int64_t S, int32_t & n_vis, int32_t & p_lo, int32_t & p_hi) {
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
void step2_avx2(int64_t p0, int64_t n, int r, const ggml_fp16_t * const * rows, const float * qs,
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
void step2_avx2_range(int64_t p0, int64_t n, int r, const ggml_fp16_t * const * rows, const float * qs,
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

void sparq_attn_fast(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * q     = dst->src[0];
    const ggml_tensor * k     = dst->src[1];
    const ggml_tensor * v     = dst->src[2];
    const ggml_tensor * mask  = dst->src[3];
    const ggml_tensor * kt    = dst->src[4];
    const ggml_tensor * vmean = dst->src[5];

    const sparq_dims d = get_dims(dst);
    const int ith = params->ith, nth = params->nth;
    const sparq_layout o = get_layout(d, nth);
    GGML_ASSERT(params->wsize >= o.total * 4);

    float   * W      = (float *) params->wdata;
    auto    * info   = (item_info *) (W + o.info);
    int32_t * i1     = (int32_t *) (W + o.i1);
    float   * ascale = W + o.ascale;
    int32_t * sel    = (int32_t *) (W + o.sel);
    float   * Lall   = W + o.L;
    float   * gsall  = W + o.gs;
    float   * pmax   = W + o.pmax;
    float   * psum   = W + o.psum;
    int32_t * hists  = (int32_t *) (W + o.hist);
    float   * part   = W + o.part;
    float   * thr    = W + o.thr + (size_t) ith * o.per_thr;

    const int64_t G = d.G, S = d.n_kv, I = d.n_items;
    const bool realloc = d.flags & GGML_SPARQ_REALLOC;
    const bool no_tau  = d.flags & GGML_SPARQ_NO_TAU;
    const bool kt_f16  = kt->type == GGML_TYPE_F16;
    const bool k_f16   = k->type == GGML_TYPE_F16;
    const bool v_f16   = v->type == GGML_TYPE_F16;
    const bool k_q8    = k->type == GGML_TYPE_Q8_0;
    const bool v_q8    = v->type == GGML_TYPE_Q8_0;

    // per-thread scratch
    float       * blk_row  = thr;                                  // SPARQ_BLK
    float       * blk_mask = thr + SPARQ_BLK;                      // SPARQ_BLK
    float       * acc      = thr + 2*SPARQ_BLK;                    // G*SPARQ_BLK
    float       * qbuf     = thr + (G + 2)*SPARQ_BLK;              // G*D: the group's q rows in f32
    float       * vrow     = qbuf + G*d.D;                         // Dv
    uint32_t    * cand     = (uint32_t *) (vrow + d.Dv);           // S
    float       * sc       = (float *) (cand + S);                 // G*(S/nth + 32): step-5 scores (two pieces of at most n/nth + 16 rows)

    auto item_coords = [&](int64_t it, int64_t & s, int64_t & b, int64_t & g) {
        g = it % d.n_head_kv; b = (it / d.n_head_kv) % d.n_batch; s = it / (d.n_head_kv * d.n_batch);
    };
    auto q_row = [&](int64_t b, int64_t h, int64_t s) {
        return (const float *) ((const char *) q->data + b*q->nb[1] + h*q->nb[2] + s*q->nb[3]);
    };

    // ---- A: per item ------------------------------------------------------------------------
    for (int64_t it = ith; it < I; it += nth) {
        int64_t s, b, g; item_coords(it, s, b, g);
        const char * mrow = mask_row(mask, b, s);
        item_info & inf = info[it];
        int32_t n_vis, p_lo, p_hi;
        scan_visible(mask, mrow, S, n_vis, p_lo, p_hi);
        inf.n_vis = n_vis; inf.p_lo = p_lo; inf.p_hi = p_hi;
        inf.dense = n_vis <= d.k_top;
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
        for (int64_t p = p_hi - 1; p >= p_lo && seen < d.l; --p) {
            if (!masked_at(mask, mrow, p)) { t_local = (int32_t) p; seen++; }
        }
        inf.t_local = t_local;
        // i1: top-r components of the group's summed |q|, ties to the lower index
        float * a = acc;  // D floats of per-thread scratch, free in this phase
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
    ggml_barrier(params->threadpool);

    // per head of item it: the global max of the approximate logits (after B), and the inverse
    // softmax denominator (after D1), from the threads' partials
    auto head_max = [&](int64_t it, float * M) {
        for (int64_t hh = 0; hh < G; ++hh) {
            float m = -INFINITY;
            for (int t = 0; t < nth; ++t) m = std::max(m, pmax[((size_t) t*I + it)*G + hh]);
            M[hh] = m;
        }
    };
    auto head_zinv = [&](int64_t it, float * zinv) {
        for (int64_t hh = 0; hh < G; ++hh) {
            double z = 0;
            for (int t = 0; t < nth; ++t) z += psum[((size_t) t*I + it)*G + hh];
            zinv[hh] = z > 0 ? (float) (1.0 / z) : 0.0f;
        }
    };

    // ---- B: approximate logits from r rows of K^T, positions split across threads, and ------
    //         their max per head
    for (int64_t it = 0; it < I; ++it) {
        const item_info & inf = info[it];
        if (inf.dense) continue;
        int64_t s, b, g; item_coords(it, s, b, g);
        int64_t c0, c1; split_range(inf.p_lo, inf.p_hi, ith, nth, c0, c1);
        const char * mrow = mask_row(mask, b, s);
        const int32_t * ii = i1 + it*d.D;
        float * L = Lall + it*G*S;
        float * gs = gsall + it*S;
        float lmax[64];
        GGML_ASSERT(G <= 64);
        for (int64_t hh = 0; hh < G; ++hh) lmax[hh] = -INFINITY;
        const char * kt0 = (const char *) kt->data + g*kt->nb[2] + s*kt->nb[3];
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
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
        if (kt_f16) {
            n8 = (c1 - c0) & ~int64_t(7);
            const ggml_fp16_t * rows[SPARQ_BLK];  // D <= SPARQ_BLK (supports_op)
            for (int32_t jj = 0; jj < d.r; ++jj) rows[jj] = (const ggml_fp16_t *) (kt0 + ii[jj]*kt->nb[1]);
            // the query values each row multiplies, per group of up to 4 heads: qs[h0*r + jj*ng + h]
            float * qs = qbuf;  // G*D floats, free until phase F
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
                    switch (ng) {
                        case 1:  step2_avx2_range<1>(p0, n, d.r, rows, qg, asc, mask, mrow, Lh, gs, lmax + h0); break;
                        case 2:  step2_avx2_range<2>(p0, n, d.r, rows, qg, asc, mask, mrow, Lh, gs, lmax + h0); break;
                        case 3:  step2_avx2_range<3>(p0, n, d.r, rows, qg, asc, mask, mrow, Lh, gs, lmax + h0); break;
                        default: step2_avx2_range<4>(p0, n, d.r, rows, qg, asc, mask, mrow, Lh, gs, lmax + h0); break;
                    }
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
    ggml_barrier(params->threadpool);

    // ---- D1: s_hat's numerators in place of the logits, exp(L - max) (0 where masked), and the
    //          softmax denominators' partials. With one head per group the selection needs no
    //          normalisation: the scores are the numerators themselves, plus the window
    for (int64_t it = 0; it < I; ++it) {
        const item_info & inf = info[it];
        if (inf.dense) continue;
        int64_t c0, c1; split_range(inf.p_lo, inf.p_hi, ith, nth, c0, c1);
        float M[64];
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
            // gs holds -1 where masked and 0 elsewhere (phase B); the numerator is 0 where masked
            float * gs = gsall + it*S;
            for (int64_t p = c0; p < c1; ++p) gs[p] += L[p];
            for (int64_t p = std::max<int64_t>(c0, inf.t_local); p < c1; ++p) {
                if (gs[p] >= 0.0f) gs[p] = INFINITY;  // the local window is always selected
            }
            score_histogram(gs, c0, c1, o.hbits, hists + (((size_t) ith*I + it) << o.hbits));
        }
    }
    ggml_barrier(params->threadpool);

    // ---- D2: the group's summed, normalised scores (more than one head per group) ------------
    if (G > 1) {
        for (int64_t it = 0; it < I; ++it) {
            const item_info & inf = info[it];
            if (inf.dense) continue;
            int64_t c0, c1; split_range(inf.p_lo, inf.p_hi, ith, nth, c0, c1);
            float zinv[64];
            head_zinv(it, zinv);
            float * gs = gsall + it*S;
            const float * L = Lall + it*G*S;
            for (int64_t p0 = c0; p0 < c1; p0 += SPARQ_BLK) {
                const int n = (int) std::min(SPARQ_BLK, c1 - p0);
                for (int64_t hh = 0; hh < G; ++hh) {
                    ggml_vec_mad_f32(n, gs + p0, L + hh*S + p0, zinv[hh]);
                }
            }
            for (int64_t p = std::max<int64_t>(c0, inf.t_local); p < c1; ++p) {
                if (gs[p] >= 0.0f) gs[p] = INFINITY;  // the local window is always selected
            }
            score_histogram(gs, c0, c1, o.hbits, hists + (((size_t) ith*I + it) << o.hbits));
        }
        ggml_barrier(params->threadpool);
    }

    // ---- E: selection, one item per thread -------------------------------------------------
    for (int64_t it = ith; it < I; it += nth) {
        item_info & inf = info[it];
        if (inf.dense) continue;
        int32_t * hp[GGML_MAX_N_THREADS];
        for (int t = 0; t < nth; ++t) hp[t] = hists + (((size_t) t*I + it) << o.hbits);
        inf.n_sel = select_top_k(gsall + it*S, inf.p_lo, inf.p_hi, d.k_top, sel + it*S, hp, nth, o.hbits, cand);
    }
    ggml_barrier(params->threadpool);

    // ---- F: exact attention on the selected rows, split across threads ---------------------
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
        int32_t * rows = (int32_t *) cand;  // free in this phase
        std::copy(isel + a0, isel + a1, rows);
        std::copy(isel + w0, isel + w1, rows + (a1 - a0));
        const float * L = Lall + it*G*S;
        float zinv[64];
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
            if (i + SPARQ_PF < na) {  // the rows are scattered: keep several loads in flight
                prefetch_row(kbase + rows[i + SPARQ_PF]*k->nb[1], krow_bytes);
            }
            const float mv = mask_at(mask, mrow, p);
            float dots[64];
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
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
            ph[0] = mx;
            ph[1] = na > 0 ? (float) ggml_vec_soft_max_f32((int) na, sc + hh*na, sc + hh*na, mx) : 0.0f;
            float al = 0.0f;
            if (!inf.dense && na > 0) {
                // s_hat's numerators (phase D1) at this thread's selected rows
                double e = 0;
                for (int64_t i = 0; i < na; ++i) e += L[hh*S + rows[i]];
                al = (float) e * zinv[hh];
            }
            ph[2] = al;
            memset(ph + 3, 0, d.Dv*sizeof(float));
        }
        // pass 3: the weighted sum of this thread's V rows
        for (int64_t i = 0; i < na; ++i) {
            const int64_t p = rows[i];
            const char * vsrc = vbase + p*v->nb[1];
            if (i + SPARQ_PF < na) {
                prefetch_row(vbase + rows[i + SPARQ_PF]*v->nb[1], vrow_bytes);
            }
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
            if (v_f16 && d.Dv % 8 == 0) {  // convert each 8 values once, for all heads of the group
                for (int64_t j = 0; j < d.Dv; j += 8) {
                    const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) ((const ggml_fp16_t *) vsrc + j)));
                    for (int64_t hh = 0; hh < G; ++hh) {
                        float * a = P + hh*o.part_stride + 3 + j;
                        _mm256_storeu_ps(a, _mm256_fmadd_ps(vv, _mm256_set1_ps(sc[hh*na + i]), _mm256_loadu_ps(a)));
                    }
                }
                continue;
            }
            if (v_q8) {  // scale each 8 values once, for all heads of the group
                const block_q8_0 * vb = (const block_q8_0 *) vsrc;
                for (int64_t ib = 0; ib < d.Dv/QK8_0; ++ib) {
                    const __m256 dv = _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(vb[ib].d));
                    for (int64_t j = 0; j < QK8_0; j += 8) {
                        const __m256 vv = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (vb[ib].qs + j)))));
                        for (int64_t hh = 0; hh < G; ++hh) {
                            float * a = P + hh*o.part_stride + 3 + ib*QK8_0 + j;
                            _mm256_storeu_ps(a, _mm256_fmadd_ps(vv, _mm256_set1_ps(sc[hh*na + i]), _mm256_loadu_ps(a)));
                        }
                    }
                }
                continue;
            }
#endif
            if (v_f16) ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) vsrc, vrow, d.Dv);
            else if (v_q8) ggml_get_type_traits(v->type)->to_float(vsrc, vrow, d.Dv);
            else memcpy(vrow, vsrc, d.Dv*sizeof(float));
            for (int64_t hh = 0; hh < G; ++hh) {
                ggml_vec_mad_f32((int) d.Dv, P + hh*o.part_stride + 3, vrow, sc[hh*na + i]);
            }
        }
    }
    ggml_barrier(params->threadpool);

    // ---- G: merge partials, mix with the mean ----------------------------------------------
    for (int64_t ih = ith; ih < I*G; ih += nth) {
        const int64_t it = ih / G, hh = ih % G;
        const item_info & inf = info[it];
        int64_t s, b, g; item_coords(it, s, b, g);
        const int64_t h = g*G + hh;
        float * out = (float *) ((char *) dst->data + h*dst->nb[1] + b*dst->nb[2] + s*dst->nb[3]);
        float M = -INFINITY;
        for (int t = 0; t < nth; ++t) M = std::max(M, part[(((size_t) t*I + it)*G + hh)*o.part_stride]);
        memset(out, 0, d.Dv*sizeof(float));
        if (inf.n_sel == 0 || M == -INFINITY) continue;
        double Ssum = 0, alpha = 0;
        for (int t = 0; t < nth; ++t) {
            const float * ph = part + (((size_t) t*I + it)*G + hh)*o.part_stride;
            alpha += ph[2];
            if (ph[0] == -INFINITY) continue;
            const float f = std::exp(ph[0] - M);
            Ssum += ph[1]*f;
            ggml_vec_mad_f32((int) d.Dv, out, ph + 3, f);
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
    // K^T in F16 or F32; K and V rows also in Q8_0 (whole blocks per row)
    auto ok_kv = [](const ggml_tensor * t, bool q8) {
        if (q8 && t->type == GGML_TYPE_Q8_0) {
            return t->ne[0] % QK8_0 == 0 && t->nb[0] == ggml_type_size(t->type);
        }
        return (t->type == GGML_TYPE_F16 || t->type == GGML_TYPE_F32) && t->nb[0] == ggml_type_size(t->type);
    };
    return q->type == GGML_TYPE_F32 && q->nb[0] == sizeof(float) && ok_kv(k, true) && ok_kv(kt, false) && ok_kv(v, true) &&
           op->type == GGML_TYPE_F32 &&
           (mask->type == GGML_TYPE_F16 || mask->type == GGML_TYPE_F32) &&
           q->ne[2] / k->ne[2] <= 64 && q->ne[0] <= SPARQ_BLK && v->ne[0] <= SPARQ_BLK;
}

void ggml_compute_forward_sparq_attn(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    if (params->use_ref) {
        if (params->ith == 0) {
            sparq_attn_ref(dst);
        }
        return;
    }
    sparq_attn_fast(params, dst);
}

} // extern "C"
