// sparq-cpp: the reference path of GGML_OP_SPARQ_ATTN (params->use_ref), which test-backend-ops
// compares the fast path (sparq.cpp) against: the steps of sparq.h written plainly, in double
// precision, on one thread, reading K rows for step 2 where the fast path reads K^T.
#include "sparq-impl.h"

#include <cfloat>
#include <cmath>
#include <numeric>
#include <vector>

namespace ggml_sparq {

static double load_elem(const ggml_tensor * t, const char * p) {
    return t->type == GGML_TYPE_F16 ? (double) GGML_CPU_FP16_TO_FP32(*(const ggml_fp16_t *) p)
                                    : (double) *(const float *) p;
}

// one K or V row (F16, F32 or Q8_0) in f32
static void load_row(const ggml_tensor * t, int64_t p, int64_t g, int64_t s, std::vector<float> & row) {
    const char * src = (const char *) t->data + p*t->nb[1] + g*t->nb[2] + s*t->nb[3];
    row.resize(t->ne[0]);
    if (t->type == GGML_TYPE_F32) {
        memcpy(row.data(), src, t->ne[0]*sizeof(float));
    } else {
        ggml_get_type_traits(t->type)->to_float(src, row.data(), t->ne[0]);
    }
}

void attn_ref(const ggml_tensor * dst) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    const ggml_tensor * mask = dst->src[3];
    const ggml_tensor * kt = dst->src[4];
    const ggml_tensor * vmean = dst->src[5];
    const ggml_tensor * sinks = dst->src[6];
    // a head's sink logit (-inf: none), and its term exp(sink - mx) of a softmax's denominator
    auto sink = [&](int64_t h) { return sinks ? (double) ((const float *) sinks->data)[h] : -INFINITY; };
    auto sink_term = [&](int64_t h, double mx) { return sink(h) == -INFINITY ? 0.0 : std::exp(sink(h) - mx); };
    const sparq_dims d = get_dims(dst);
    const bool realloc = d.flags & GGML_SPARQ_REALLOC;
    const bool no_tau  = d.flags & GGML_SPARQ_NO_TAU;

    auto qv = [&](int64_t j, int64_t b, int64_t h, int64_t s) {
        return (double) *(const float *) ((const char *) q->data + j*q->nb[0] + b*q->nb[1] + h*q->nb[2] + s*q->nb[3]);
    };
    // step 2 reads K^T (component j of position p); steps 5-6 read whole K and V rows
    auto ktv = [&](int64_t j, int64_t p, int64_t g, int64_t s) {
        const char * at = (const char *) kt->data + p*kt->nb[0] + g*kt->nb[2] + s*kt->nb[3];
        if (kt->type == GGML_TYPE_I8) {  // int8 times 2^e, e in row D
            return std::ldexp((double) *(const int8_t *) (at + j*kt->nb[1]), *(const int8_t *) (at + d.D*kt->nb[1]));
        }
        return load_elem(kt, at + j*kt->nb[1]);
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
        int32_t k_top, l;
        query_budget(d, n_vis, k_top, l);
        std::vector<int64_t> sel;
        std::vector<double> alpha(d.G, 1.0), sink_hat(d.G, 0.0);
        std::vector<std::vector<double>> shat(d.G, std::vector<double>(n_vis, 0.0));
        if (n_vis <= k_top) {
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
                double mx = sink(h);
                for (int64_t i = 0; i < n_vis; ++i) {
                    double dot = 0;
                    for (int64_t j : order) dot += qv(j, b, h, s) * ktv(j, vis[i], g, s);
                    lg[i] = dot * sc + mask_at(mask, mrow, vis[i]);
                    mx = std::max(mx, lg[i]);
                }
                double z = sink_term(h, mx);
                sink_hat[hh] = z;
                for (int64_t i = 0; i < n_vis; ++i) z += std::exp(lg[i] - mx);
                sink_hat[hh] = z > 0 ? sink_hat[hh] / z : 0.0;
                for (int64_t i = 0; i < n_vis; ++i) {
                    const double e = std::exp(lg[i] - mx);  // numerators below FLT_MIN count as 0
                    shat[hh][i] = e < FLT_MIN ? 0.0 : e / z;
                    gsum[i] += shat[hh][i];
                }
            }
            // local window: the last l visible positions; then the best of the rest
            std::vector<char> chosen(n_vis, 0);
            for (int64_t i = std::max<int64_t>(0, n_vis - l); i < n_vis; ++i) chosen[i] = 1;
            std::vector<int64_t> rest;
            for (int64_t i = 0; i < n_vis - l; ++i) rest.push_back(i);
            std::stable_sort(rest.begin(), rest.end(), [&](int64_t x, int64_t y) { return gsum[x] > gsum[y]; });
            for (int64_t i = 0; i < k_top - l; ++i) chosen[rest[i]] = 1;
            for (int64_t hh = 0; hh < d.G; ++hh) {
                alpha[hh] = sink_hat[hh];  // the sink is always chosen
                for (int64_t i = 0; i < n_vis; ++i) if (chosen[i]) alpha[hh] += shat[hh][i];
            }
            for (int64_t i = 0; i < n_vis; ++i) if (chosen[i]) sel.push_back(vis[i]);
        }
        for (int64_t hh = 0; hh < d.G; ++hh) {
            const int64_t h = g*d.G + hh;
            float * out = (float *) ((char *) dst->data + h*dst->nb[1] + b*dst->nb[2] + s*dst->nb[3]);
            std::vector<double> lg(sel.size()), y(d.Dv, 0.0);
            double mx = sink(h), z = 0;
            for (size_t i = 0; i < sel.size(); ++i) {
                load_row(k, sel[i], g, s, krow);
                double dot = 0;
                for (int64_t j = 0; j < d.D; ++j) dot += qv(j, b, h, s) * krow[j];
                lg[i] = dot * d.scale + mask_at(mask, mrow, sel[i]);
                mx = std::max(mx, lg[i]);
            }
            z = sel.empty() ? 0.0 : sink_term(h, mx);
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

} // namespace ggml_sparq
