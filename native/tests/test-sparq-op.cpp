// sparq-cpp: GGML_OP_SPARQ_ATTN on the CPU backend against a reference written here, independently
// of the kernel, straight from docs/sparq.md (double precision, sorts instead of selections).
//
//   random cases    head dims 64/128/256 (and 512), groups 1/3/4/8, several query rows with their own
//                   visible lengths, 1-3 threads, F16, F32 and Q8_0 K/V, F16 and F32 masks
//   adversarial     ties in |q| and in scores, fully and partly masked rows, S < k, S = 1,
//                   r = D, l = k, large magnitudes, no reallocation, no tau
//   row budget      k from each query row's own visible count, rows below min_vis dense
//   dense           k >= S and l = 0 equals plain softmax attention
//   NaN poison      every K^T row outside i1, every masked K^T entry, every K and V row outside
//                   i2 is NaN: the output must stay finite and equal to the reference
//   sinks           learned attention sinks (one logit per head, no value row) in the random,
//                   dense and poison cases
//
// Prints one line per failure and ends with "N passed, N failed"; exit code 1 on any failure.

#include "ggml.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

struct Case {
    int D = 64, G = 3, Hkv = 2, nb = 1, S = 300;
    int r = 8, k = 32, l = 8;
    float k_frac = 0.0f;  // > 0: each row's k from its own visible count (ggml_sparq_attn_set_budget)
    int l_div = 0;        // with k_frac: > 0, each row's window is its k / l_div; 0: l, at most its k
    int min_vis = 0;      // rows with fewer visible positions attend to all of them
    bool realloc = true, no_tau = false;
    bool kt_i8 = false;  // K^T as the fused op's I8 (ggml_sparq_quantize_kt), else K's type
    bool sinks = false;  // a learned attention sink per query head (ggml_sparq_attn_add_sinks)
    int ops = -1;        // >= 0: the portable graph (ggml_sparq_attn_ops) with these extra flags
    ggml_type tkv = GGML_TYPE_F16, tmask = GGML_TYPE_F16;
    int threads = 2;
    float qmag = 1.0f, kmag = 1.0f;
    std::string what;
};

struct Data {
    // host copies, in the kernel's layouts: q[b][h][D], K[g][S][D], V[g][S][D], mask[b][S], vmean[b][g][D]
    std::vector<float> q, K, V, mask, vmean;
    std::vector<float> KT;  // poison test only: the K^T values, indexed like K ([g][p][j])
    std::vector<float> KQ;  // I8 K^T: the values step 2 sees, indexed like K (empty: K's own)
    std::vector<float> sink;  // per query head (empty: no sinks)
};

// K through the I8 K^T and back: what step 2 sees
std::vector<float> round_kt_i8(const std::vector<float> & K, int D) {
    std::vector<float> out(K.size());
    std::vector<int8_t> qv(D);
    for (size_t row = 0; row < K.size()/D; ++row) {
        int8_t e;
        ggml_sparq_quantize_kt(&K[row*D], D, qv.data(), 1, &e);
        for (int j = 0; j < D; ++j) out[row*D + j] = std::ldexp((float) qv[j], e);
    }
    return out;
}

float round_f16(float x) { return ggml_fp16_to_fp32(ggml_fp32_to_fp16(x)); }

// The reference: docs/sparq.md steps 1-6 for one (query row b, KV head g). Returns the output rows of
// the group's heads and, for the poison test, i1 and i2.
void reference(const Case & c, const Data & d, int b, int g, std::vector<double> & out,
               std::vector<int> * i1_out = nullptr, std::vector<int> * i2_out = nullptr) {
    const int D = c.D, S = c.S, G = c.G;
    auto q = [&](int h, int j) { return (double) d.q[((size_t) b*c.G*c.Hkv + h)*D + j]; };
    auto K = [&](int p, int j) { return (double) d.K[((size_t) g*S + p)*D + j]; };
    auto KS = [&](int p, int j) { return d.KQ.empty() ? K(p, j) : (double) d.KQ[((size_t) g*S + p)*D + j]; };  // step 2's
    auto V = [&](int p, int j) { return (double) d.V[((size_t) g*S + p)*D + j]; };
    auto M = [&](int p) { return (double) d.mask[(size_t) b*S + p]; };
    auto sink = [&](int h) { return d.sink.empty() ? -INFINITY : (double) d.sink[h]; };
    auto sink_w = [&](int h, double mx) { return d.sink.empty() ? 0.0 : std::exp(sink(h) - mx); };
    const double scale = 1.0 / std::sqrt((double) D);

    std::vector<int> vis;
    for (int p = 0; p < S; ++p) if (!std::isinf(M(p))) vis.push_back(p);
    const int n = (int) vis.size();
    // the row's budget (docs/sparq.md): k and l as given, or its own share of its visible positions
    int k = c.k, l = c.l;
    if (n < c.min_vis) {
        k = n; l = 0;
    } else if (c.k_frac > 0) {
        k = (int) std::clamp<long>(std::lround((double) c.k_frac * n), 1, c.k);
        l = c.l_div > 0 ? k / c.l_div : std::min(c.l, k);
    }

    std::vector<int> i1(D), i2;
    std::iota(i1.begin(), i1.end(), 0);
    std::vector<double> alpha(G, 1.0);  // steps 2-4 set it below k < n
    std::vector<std::vector<double>> shat(G, std::vector<double>(S, 0.0));
    if (n > k) {
        std::vector<double> a(D, 0.0);
        for (int hh = 0; hh < G; ++hh) for (int j = 0; j < D; ++j) a[j] += std::fabs(q(g*G + hh, j));
        std::stable_sort(i1.begin(), i1.end(), [&](int x, int y) { return a[x] > a[y]; });
        i1.resize(std::min(c.r, D));
        std::vector<double> sum(S, 0.0);
        for (int hh = 0; hh < G; ++hh) {
            const int h = g*G + hh;
            double l1 = 0, l1s = 0;
            for (int j = 0; j < D; ++j) l1 += std::fabs(q(h, j));
            for (int j : i1) l1s += std::fabs(q(h, j));
            const double tau = c.no_tau ? std::sqrt((double) D) : std::sqrt(D * (l1 > 0 && l1s > 0 ? l1s / l1 : 1.0));
            std::vector<double> x(S, -INFINITY);
            double mx = sink(h);
            for (int p : vis) {
                double dot = 0;
                for (int j : i1) dot += q(h, j) * KS(p, j);
                // scale = 1/sqrt(D): dot*scale*sqrt(D)/tau = dot/tau
                x[p] = dot / tau + M(p);
                mx = std::max(mx, x[p]);
            }
            // a sink: one more term of the denominator, always chosen (alpha starts with its share)
            double z = sink_w(h, mx);
            for (int p : vis) z += std::exp(x[p] - mx);
            alpha[hh] = sink_w(h, mx) / z;
            for (int p : vis) {
                // fp32 semantics (docs/sparq.md, "Ties and rounding"): a score below the smallest normal
                // float is 0, and such ties go to the lower position
                const double e = std::exp(x[p] - mx);
                shat[hh][p] = e < FLT_MIN ? 0.0 : e / z;
                sum[p] += shat[hh][p];
            }
        }
        std::vector<int> rest(vis.begin(), vis.end() - l);
        std::stable_sort(rest.begin(), rest.end(), [&](int x, int y) { return sum[x] > sum[y]; });
        rest.resize(k - l);
        i2 = rest;
        i2.insert(i2.end(), vis.end() - l, vis.end());
        std::sort(i2.begin(), i2.end());
        for (int hh = 0; hh < G; ++hh) {
            for (int p : i2) alpha[hh] += shat[hh][p];
        }
    } else {
        i2 = vis;
    }
    out.assign((size_t) G*D, 0.0);
    for (int hh = 0; hh < G; ++hh) {
        const int h = g*G + hh;
        if (i2.empty()) continue;
        std::vector<double> x;
        double mx = sink(h);
        for (int p : i2) {
            double dot = 0;
            for (int j = 0; j < D; ++j) dot += q(h, j) * K(p, j);
            x.push_back(dot * scale + M(p));
            mx = std::max(mx, x.back());
        }
        double z = sink_w(h, mx);
        std::vector<double> y(D, 0.0);
        for (size_t i = 0; i < i2.size(); ++i) {
            const double w = std::exp(x[i] - mx);
            z += w;
            for (int j = 0; j < D; ++j) y[j] += w * V(i2[i], j);
        }
        for (int j = 0; j < D; ++j) {
            const double ys = y[j] / z;
            const double vm = d.vmean[((size_t) b*c.Hkv + g)*D + j];
            out[(size_t) hh*D + j] = c.realloc ? alpha[hh]*ys + (1 - alpha[hh])*vm : ys;
        }
    }
    if (i1_out) *i1_out = n > k ? i1 : std::vector<int>();
    if (i2_out) *i2_out = i2;
}

// dense softmax attention for one (b, h), the k >= S check
void dense(const Case & c, const Data & d, int b, int h, std::vector<double> & out) {
    const int D = c.D, S = c.S, g = h / c.G;
    std::vector<double> x(S, -INFINITY);
    double mx = d.sink.empty() ? -INFINITY : (double) d.sink[h];
    for (int p = 0; p < S; ++p) {
        if (std::isinf(d.mask[(size_t) b*S + p])) continue;
        double dot = 0;
        for (int j = 0; j < D; ++j) {
            dot += (double) d.q[((size_t) b*c.G*c.Hkv + h)*D + j] * d.K[((size_t) g*S + p)*D + j];
        }
        x[p] = dot / std::sqrt((double) D) + d.mask[(size_t) b*S + p];
        mx = std::max(mx, x[p]);
    }
    out.assign(D, 0.0);
    double z = d.sink.empty() ? 0.0 : std::exp(d.sink[h] - mx);
    for (int p = 0; p < S; ++p) {
        if (std::isinf(x[p])) continue;
        const double w = std::exp(x[p] - mx);
        z += w;
        for (int j = 0; j < D; ++j) out[j] += w * d.V[((size_t) g*S + p)*D + j];
    }
    if (z > 0) for (double & o : out) o /= z;
}

// Q8_0 rows through ggml's quantizer; a row holding NaN gets NaN block scales (the quantizer
// would turn NaN into finite values, and the poison test needs it to stay NaN)
void set_q8_0(ggml_tensor * t, const std::vector<float> & v) {
    const int64_t n = t->ne[0], rows = (int64_t) v.size()/n;
    ggml_quantize_chunk(GGML_TYPE_Q8_0, v.data(), t->data, 0, rows, n, nullptr);
    for (int64_t r = 0; r < rows; ++r) {
        if (std::any_of(v.begin() + r*n, v.begin() + (r + 1)*n, [](float x) { return std::isnan(x); })) {
            char * row = (char *) t->data + r*t->nb[1];
            for (int64_t ib = 0; ib < n/32; ++ib) {
                const ggml_fp16_t h = ggml_fp32_to_fp16(std::nanf(""));
                memcpy(row + ib*ggml_type_size(GGML_TYPE_Q8_0), &h, sizeof(h));
            }
        }
    }
}

// what a Q8_0 row holds after quantization
void round_q8_0(std::vector<float> & v, int64_t n) {
    std::vector<uint8_t> qb(ggml_row_size(GGML_TYPE_Q8_0, n)*(v.size()/n));
    ggml_quantize_chunk(GGML_TYPE_Q8_0, v.data(), qb.data(), 0, (int64_t) v.size()/n, n, nullptr);
    ggml_get_type_traits(GGML_TYPE_Q8_0)->to_float(qb.data(), v.data(), (int64_t) v.size());
}

void set_tensor(ggml_tensor * t, const std::vector<float> & v) {
    if (t->type == GGML_TYPE_Q8_0) {
        set_q8_0(t, v);
    } else if (t->type == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(v.data(), (ggml_fp16_t *) t->data, (int64_t) v.size());
    } else {
        memcpy(t->data, v.data(), v.size()*sizeof(float));
    }
}

// Runs the op. K^T is laid out as in the cache: rows of cache length kv_size > S (a view).
std::vector<float> run_op(const Case & c, const Data & d, const Data * poison = nullptr) {
    const int D = c.D, S = c.S, H = c.G*c.Hkv, kv_size = S + 37;
    const size_t mem = 64*1024*1024 + (size_t) 8*(4*(size_t) c.Hkv*kv_size*D + (size_t) c.nb*H*D + (size_t) c.nb*S);
    ggml_init_params ip = { mem, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    const Data & src = poison ? *poison : d;

    ggml_tensor * q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, D, c.nb, H, 1);
    // q[b][h][j] -> q tensor [D, nb, H]
    for (int b = 0; b < c.nb; ++b) for (int h = 0; h < H; ++h)
        memcpy((char *) q->data + b*q->nb[1] + h*q->nb[2], &d.q[((size_t) b*H + h)*D], D*sizeof(float));

    ggml_tensor * k0 = ggml_new_tensor_4d(ctx, c.tkv, D, kv_size, c.Hkv, 1);
    ggml_tensor * v0 = ggml_new_tensor_4d(ctx, c.tkv, D, kv_size, c.Hkv, 1);
    // K^T is F16 or F32; with Q8_0 K/V it is F32 (the cache's K^T mirror is F16, but F32 holds the
    // dequantized values exactly, so the reference sees what the op sees)
    ggml_tensor * kt0 = c.kt_i8 ? ggml_new_tensor_4d(ctx, GGML_TYPE_I8, kv_size, D + 1, c.Hkv, 1)
                                : ggml_new_tensor_4d(ctx, c.tkv == GGML_TYPE_Q8_0 ? GGML_TYPE_F32 : c.tkv, kv_size, D, c.Hkv, 1);
    std::vector<float> kf((size_t) c.Hkv*kv_size*D, 0.0f), vf(kf.size(), 0.0f), ktf(kf.size(), 0.0f);
    for (int g = 0; g < c.Hkv; ++g) for (int p = 0; p < S; ++p) for (int j = 0; j < D; ++j) {
        kf[((size_t) g*kv_size + p)*D + j] = src.K[((size_t) g*S + p)*D + j];
        vf[((size_t) g*kv_size + p)*D + j] = src.V[((size_t) g*S + p)*D + j];
    }
    // K^T: the transpose of K, unless the poison test brings its own
    const std::vector<float> & ktv = (poison && !poison->KT.empty()) ? poison->KT : src.K;
    for (int g = 0; g < c.Hkv; ++g) for (int j = 0; j < D; ++j) for (int p = 0; p < S; ++p)
        ktf[((size_t) g*D + j)*kv_size + p] = ktv[((size_t) g*S + p)*D + j];
    set_tensor(k0, kf); set_tensor(v0, vf);
    if (c.kt_i8) {  // each position's D components quantized together, its exponent in row D
        for (int p = 0; p < S; ++p) {
            ggml_sparq_quantize_kt_heads(&ktv[(size_t) p*D], (size_t) S*D, D, c.Hkv, (int8_t *) kt0->data + p, kv_size);
        }
    } else {
        set_tensor(kt0, ktf);
    }
    ggml_tensor * k = ggml_view_4d(ctx, k0, D, S, c.Hkv, 1, k0->nb[1], k0->nb[2], k0->nb[3], 0);
    ggml_tensor * v = ggml_view_4d(ctx, v0, D, S, c.Hkv, 1, v0->nb[1], v0->nb[2], v0->nb[3], 0);
    ggml_tensor * kt = ggml_view_4d(ctx, kt0, S, kt0->ne[1], c.Hkv, 1, kt0->nb[1], kt0->nb[2], kt0->nb[3], 0);

    ggml_tensor * m = ggml_new_tensor_4d(ctx, c.tmask, S, c.nb, 1, 1);
    set_tensor(m, d.mask);
    ggml_tensor * vm = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, D, c.Hkv, c.nb, 1);
    memcpy(vm->data, d.vmean.data(), d.vmean.size()*sizeof(float));

    const int flags = (c.realloc ? GGML_SPARQ_REALLOC : 0) | (c.no_tau ? GGML_SPARQ_NO_TAU : 0);
    ggml_tensor * sk = nullptr;
    if (!d.sink.empty()) {
        sk = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, H);
        memcpy(sk->data, d.sink.data(), H*sizeof(float));
    }
    ggml_tensor * out = nullptr;
    if (c.ops >= 0) {
        // the portable graph: one k for every row, the window from each row's visible ranks
        ggml_tensor * rank = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, S, c.nb, 1, 1);
        bool all_see_k = true;
        for (int b = 0; b < c.nb; ++b) {
            float rk = 0.0f;
            for (int p = S - 1; p >= 0; --p) {
                const bool vis = !std::isinf(d.mask[(size_t) b*S + p]);
                ((float *) rank->data)[(size_t) b*S + p] = vis ? rk : 1e9f;
                rk += vis ? 1.0f : 0.0f;
            }
            all_see_k = all_see_k && rk >= c.k;
        }
        ggml_tensor * bias = ggml_sparq_window_bias(ctx, m, rank, c.l);
        q = ggml_permute(ctx, ggml_reshape_4d(ctx, ggml_cont(ctx, ggml_permute(ctx, q, 0, 2, 1, 3)), D, H, c.nb, 1), 0, 2, 1, 3);
        out = ggml_sparq_attn_ops(ctx, q, k, kt, v, c.realloc ? vm : nullptr, m, bias, sk, 1.0f/std::sqrt((float) D),
                                  c.r, c.k, flags | c.ops | (all_see_k ? GGML_SPARQ_ALL_SEE_K : 0));
    } else {
        out = ggml_sparq_attn(ctx, q, k, kt, v, vm, m, 1.0f/std::sqrt((float) D), c.r, c.k, c.l, flags);
        if (c.k_frac > 0 || c.min_vis > 0) {
            ggml_sparq_attn_set_budget(out, c.k_frac, c.l_div, c.min_vis);
        }
        ggml_sparq_attn_add_sinks(out, sk);
    }
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_graph_compute_with_ctx(ctx, gf, c.threads);

    // out: [D, H, nb] -> [b][h][j]
    std::vector<float> res((size_t) c.nb*H*D);
    for (int b = 0; b < c.nb; ++b) for (int h = 0; h < H; ++h)
        memcpy(&res[((size_t) b*H + h)*D], (char *) out->data + h*out->nb[1] + b*out->nb[2], D*sizeof(float));
    ggml_free(ctx);
    return res;
}

Data make_data(const Case & c, std::mt19937 & gen, int mask_mode) {
    const int D = c.D, S = c.S, H = c.G*c.Hkv;
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    std::uniform_int_distribution<int> comp(0, D - 1);
    Data d;
    d.q.resize((size_t) c.nb*H*D);
    for (float & x : d.q) x = nd(gen) * c.qmag;
    for (size_t row = 0; row < d.q.size()/D; ++row)       // a few heavy components, as in real queries
        for (int t = 0; t < 4; ++t) d.q[row*D + comp(gen)] *= 5.0f;
    d.K.resize((size_t) c.Hkv*S*D);
    for (float & x : d.K) x = nd(gen) * c.kmag;
    d.V.resize(d.K.size());
    for (float & x : d.V) x = nd(gen);
    if (c.tkv == GGML_TYPE_F16) {  // the op sees f16 values: the reference must too
        for (float & x : d.K) x = round_f16(x);
        for (float & x : d.V) x = round_f16(x);
    }
    if (c.tkv == GGML_TYPE_Q8_0) {  // the same for Q8_0 rows
        round_q8_0(d.K, D);
        round_q8_0(d.V, D);
    }
    if (c.kt_i8) d.KQ = round_kt_i8(d.K, D);
    if (c.sinks) {  // about log(S) +- 2: as much weight as many positions, as trained sinks hold
        std::uniform_real_distribution<float> us(std::log((float) S) - 2.0f, std::log((float) S) + 2.0f);
        d.sink.resize(H);
        for (float & x : d.sink) x = us(gen);
    }
    d.vmean.resize((size_t) c.nb*c.Hkv*D);
    for (float & x : d.vmean) x = nd(gen) * 0.1f;
    d.mask.assign((size_t) c.nb*S, 0.0f);
    std::uniform_int_distribution<int> len(1, S);
    for (int b = 0; b < c.nb; ++b) {
        const int n = b == 0 ? S : len(gen);  // several sequences with their own visible lengths
        for (int p = 0; p < S; ++p) {
            bool vis = p < n;
            if (mask_mode == 1) vis = vis && u(gen) > 0.2f;          // holes
            if (mask_mode == 2 && b == c.nb - 1) vis = false;       // a fully masked row
            d.mask[(size_t) b*S + p] = vis ? 0.0f : -INFINITY;
        }
    }
    return d;
}

int n_pass = 0, n_fail = 0;

void check(const Case & c, const Data & d, const std::vector<float> & got, bool vs_dense, const char * tag) {
    const int H = c.G*c.Hkv, D = c.D;
    double max_err = 0, max_ref = 0;
    bool finite = true;
    for (int b = 0; b < c.nb; ++b) {
        for (int g = 0; g < c.Hkv; ++g) {
            std::vector<double> ref;
            if (vs_dense) {
                ref.resize((size_t) c.G*D);
                for (int hh = 0; hh < c.G; ++hh) {
                    std::vector<double> one;
                    dense(c, d, b, g*c.G + hh, one);
                    std::copy(one.begin(), one.end(), ref.begin() + (size_t) hh*D);
                }
            } else {
                reference(c, d, b, g, ref);
            }
            for (int hh = 0; hh < c.G; ++hh) for (int j = 0; j < D; ++j) {
                const float o = got[((size_t) b*H + g*c.G + hh)*D + j];
                finite = finite && std::isfinite(o);
                max_err = std::max(max_err, std::fabs(o - ref[(size_t) hh*D + j]));
                max_ref = std::max(max_ref, std::fabs(ref[(size_t) hh*D + j]));
            }
        }
    }
    const double rel = max_err / std::max(1e-3, max_ref);
    // the portable graph attends with ggml's flash attention, which on the CPU rounds q to the
    // cache's dot type (F16 rows, or Q8_0 blocks) as llama.cpp's dense attention does
    const double tol = c.ops < 0 ? 2e-3 : c.tkv == GGML_TYPE_Q8_0 ? 2e-2 : 5e-3;
    const bool ok = finite && rel < tol;
    if (ok) {
        n_pass++;
    } else {
        n_fail++;
        printf("FAIL %-10s %s: D=%d G=%d Hkv=%d nb=%d S=%d r=%d k=%d l=%d k_frac=%g l_div=%d min_vis=%d realloc=%d no_tau=%d kv=%s kt=%s mask=%s threads=%d: "
               "max rel err %.3g%s\n", tag, c.what.c_str(), c.D, c.G, c.Hkv, c.nb, c.S, c.r, c.k, c.l, c.k_frac, c.l_div, c.min_vis, c.realloc, c.no_tau,
               ggml_type_name(c.tkv), c.kt_i8 ? "i8" : "kv", ggml_type_name(c.tmask), c.threads, rel, finite ? "" : " (non-finite output)");
    }
}

void run_case(Case c, std::mt19937 & gen, int mask_mode = 0) {
    Data d = make_data(c, gen, mask_mode);
    check(c, d, run_op(c, d), false, "reference");
}

// tie cases: duplicate K rows (equal scores) and equal |q| components
void run_ties(Case c, std::mt19937 & gen) {
    Data d = make_data(c, gen, 0);
    for (int g = 0; g < c.Hkv; ++g)
        for (int p = 1; p < c.S; p += 2)
            std::copy_n(&d.K[((size_t) g*c.S + p - 1)*c.D], c.D, &d.K[((size_t) g*c.S + p)*c.D]);
    if (c.kt_i8) d.KQ = round_kt_i8(d.K, c.D);
    for (float & x : d.q) x = x > 0 ? 1.0f : -1.0f;
    check(c, d, run_op(c, d), false, "ties");
}

// the portable graph against the reference where no near-tie can move a selection: each group's
// r components of q clearly the largest (the r heavy ones of each of its heads), k = l (the
// selection is each row's local window)
void run_ops(Case c, std::mt19937 & gen, int mask_mode) {
    c.l = c.k;
    Data d = make_data(c, gen, mask_mode);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<int> comps(c.D);
    for (int b = 0; b < c.nb; ++b) for (int g = 0; g < c.Hkv; ++g) {
        std::iota(comps.begin(), comps.end(), 0);
        std::shuffle(comps.begin(), comps.end(), gen);
        for (int hh = 0; hh < c.G; ++hh) {
            float * row = &d.q[(((size_t) b*c.Hkv + g)*c.G + hh)*c.D];
            for (int j = 0; j < c.D; ++j) row[j] = u(gen);
            for (int t = 0; t < c.r; ++t) row[comps[t]] = (u(gen) < 0 ? -1.0f : 1.0f)*(3.0f + std::fabs(u(gen)));
        }
    }
    check(c, d, run_op(c, d), false, c.ops & GGML_SPARQ_GATHER ? "ops-gather" : "ops-mask");
}

// the portable graph's nodes that do work (views, reshapes and permutes are none): what a GPU
// launches per layer and stream
int ops_nodes(int D, int G, int Hkv, int nb, int flags, bool sinks) {
    const int S = 4096, H = G*Hkv;
    ggml_init_params ip = { 256*ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * q  = ggml_permute(ctx, ggml_new_tensor_4d(ctx, GGML_TYPE_F32, D, H, nb, 1), 0, 2, 1, 3);
    ggml_tensor * k  = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, D, S, Hkv, 1);
    ggml_tensor * kt = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, S, D, Hkv, 1);
    ggml_tensor * v  = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, D, S, Hkv, 1);
    ggml_tensor * vm = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, D, Hkv, nb, 1);
    ggml_tensor * m  = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, S, nb, 1, 1);
    ggml_tensor * bias = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, S, nb, 1, 1);
    ggml_tensor * sk = sinks ? ggml_new_tensor_1d(ctx, GGML_TYPE_F32, H) : nullptr;
    ggml_tensor * out = ggml_sparq_attn_ops(ctx, q, k, kt, v, (flags & GGML_SPARQ_REALLOC) ? vm : nullptr, m, bias, sk,
                                            0.125f, D/8, S/16, flags);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    int n = 0;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        switch (ggml_graph_node(gf, i)->op) {
            case GGML_OP_NONE: case GGML_OP_VIEW: case GGML_OP_RESHAPE: case GGML_OP_PERMUTE: case GGML_OP_TRANSPOSE: break;
            default: ++n;
        }
    }
    ggml_free(ctx);
    return n;
}

void run_poison(Case c, std::mt19937 & gen) {
    c.nb = 1;  // K/V rows are shared by the query rows of a stream: poison per KV head
    Data d = make_data(c, gen, 1);
    Data p = d;
    p.KT = d.K;
    const float nan = std::nanf("");
    for (int g = 0; g < c.Hkv; ++g) {
        std::vector<double> out;
        std::vector<int> i1, i2;
        reference(c, d, 0, g, out, &i1, &i2);
        std::vector<char> in1(c.D, 0), in2(c.S, 0);
        for (int j : i1) in1[j] = 1;
        for (int q : i2) in2[q] = 1;
        for (int q = 0; q < c.S; ++q) {
            const bool masked = std::isinf(d.mask[q]);
            for (int j = 0; j < c.D; ++j) {
                const size_t at = ((size_t) g*c.S + q)*c.D + j;
                if (!in1[j] || masked) p.KT[at] = nan;           // K^T: only rows i1, visible positions
                if (!in2[q]) { p.K[at] = nan; p.V[at] = nan; }   // K, V: only rows i2
            }
        }
    }
    // q, mask and vmean come from the clean data; K, V and K^T from the poisoned copy
    std::vector<float> got = run_op(c, d, &p);
    check(c, d, got, false, "nan-poison");
}

} // namespace

int main() {
    std::mt19937 gen(42);
    ggml_cpu_init();

    // random cases
    for (int D : {64, 128, 256})
    for (int G : {1, 3, 4, 8})
    for (ggml_type tkv : {GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_Q8_0}) {
        Case c; c.D = D; c.G = G; c.tkv = tkv; c.what = "random";
        c.nb = 3; c.S = 700; c.r = D/8; c.k = 48; c.l = 12;
        c.threads = 1 + (D + G) % 3;
        run_case(c, gen);
        c.tmask = GGML_TYPE_F32; c.realloc = false;
        run_case(c, gen, 1);
        if (tkv != GGML_TYPE_F32) {  // the I8 K^T (the cache's for F16 and Q8_0 K)
            c.kt_i8 = true; c.realloc = true; c.tmask = GGML_TYPE_F16;
            run_case(c, gen);
            c.tmask = GGML_TYPE_F32; c.realloc = false;
            run_case(c, gen, 1);
        }
    }
    // adversarial cases
    {
        Case c; c.what = "holes";        c.nb = 4; c.S = 1000; run_case(c, gen, 1);
        c.what = "fully-masked-row";                          run_case(c, gen, 2);
        c.what = "S<k";      c.S = 20;   c.k = 32;  c.l = 8;  run_case(c, gen, 1);
        c.what = "S=1";      c.S = 1;    c.k = 32;  c.l = 8;  c.nb = 1; run_case(c, gen);
        c.what = "S=k+1";    c.S = 33;                        c.nb = 2; run_case(c, gen);
        c.what = "r=D";      c.S = 500;  c.r = 64;            run_case(c, gen);
        c.what = "l=k";      c.r = 8;    c.k = 40;  c.l = 40; run_case(c, gen, 1);
        c.what = "l=0";      c.l = 0;                         run_case(c, gen);
        c.what = "k=1";      c.k = 1;    c.l = 0;             run_case(c, gen);
        c.what = "large";    c.k = 32;   c.l = 8; c.qmag = 30.0f; c.kmag = 4.0f; run_case(c, gen);
        c.what = "no-tau";   c.qmag = 1.0f; c.kmag = 1.0f; c.no_tau = true; run_case(c, gen);
        c.what = "long";     c.no_tau = false; c.S = 9000; c.k = 600; c.l = 150; c.G = 4; c.Hkv = 1; c.D = 128; c.r = 16;
        for (int t : {1, 2, 3}) { c.threads = t; run_case(c, gen, 1); }
        c.what = "long-i8"; c.kt_i8 = true;
        for (int t : {1, 2}) { c.threads = t; run_case(c, gen, 1); }
        c.what = "large-i8"; c.S = 500; c.k = 32; c.l = 8; c.G = 3; c.Hkv = 2; c.D = 64; c.r = 8; c.qmag = 30.0f; c.kmag = 4.0f; run_case(c, gen);
        c.what = "small-k-i8"; c.qmag = 1.0f; c.kmag = 1e-30f; run_case(c, gen);
        Case tc; tc.what = "ties"; tc.S = 400; tc.nb = 2;
        for (int G : {1, 3}) { tc.G = G; run_ties(tc, gen); }
        tc.what = "ties-i8"; tc.kt_i8 = true;
        for (int G : {1, 3}) { tc.G = G; run_ties(tc, gen); }
    }
    // a budget per query row (several rows with their own visible lengths): k from each row's
    // count (k_frac), rows below min_vis dense; a fixed k with min_vis
    for (int G : {1, 4}) for (bool i8 : {false, true}) for (int t : {1, 3}) {
        Case c; c.what = "row-budget"; c.G = G; c.nb = 6; c.S = 1200; c.r = 8; c.k_frac = 0.09f; c.k = 108; c.l = 27;
        c.l_div = 4; c.min_vis = 300; c.kt_i8 = i8; c.threads = t;
        run_case(c, gen);
        run_case(c, gen, 1);
        c.what = "row-budget-l"; c.l_div = 0; c.l = 20;
        run_case(c, gen);
        c.what = "row-budget-k"; c.k_frac = 0.0f; c.k = 64; c.l = 16; c.min_vis = 500;
        run_case(c, gen);
        c.what = "row-budget-poison"; c.k_frac = 0.05f; c.k = 60; c.l = 15; c.min_vis = 0; c.kt_i8 = false;  // NaN: float K^T only
        run_poison(c, gen);
    }
    // dense: k >= S, l = 0
    for (int D : {64, 256}) for (int G : {1, 4}) for (bool sinks : {false, true}) {
        Case c; c.what = sinks ? "dense-sinks" : "dense"; c.D = D; c.G = G; c.nb = 3; c.S = 300; c.k = 300; c.l = 0; c.sinks = sinks;
        Data d = make_data(c, gen, 1);
        check(c, d, run_op(c, d), true, "dense");
    }
    // head size 512 (Gemma 4's global layers)
    for (int G : {1, 4}) for (ggml_type tkv : {GGML_TYPE_F16, GGML_TYPE_Q8_0}) {
        Case c; c.what = "d512"; c.D = 512; c.G = G; c.Hkv = 1; c.tkv = tkv; c.nb = 2; c.S = 600; c.r = 64; c.k = 48; c.l = 12;
        run_case(c, gen, 1);
        c.kt_i8 = true; run_case(c, gen);
        c.what = "d512-poison"; c.kt_i8 = false; run_poison(c, gen);
    }
    // learned attention sinks (gpt-oss: head size 64, 8 query heads per KV head)
    for (int G : {1, 8}) for (bool realloc : {false, true}) for (int t : {1, 3}) {
        Case c; c.what = "sinks"; c.sinks = true; c.G = G; c.realloc = realloc; c.threads = t;
        c.nb = 3; c.S = 900; c.k = 64; c.l = 16;
        run_case(c, gen, 1);
        c.kt_i8 = true; c.tkv = GGML_TYPE_Q8_0;
        run_case(c, gen);
        c.what = "sinks-poison"; c.kt_i8 = false; c.tkv = GGML_TYPE_F16;
        run_poison(c, gen);
    }
    // NaN poison: what must not be read is NaN
    for (int D : {64, 128, 256}) for (int G : {1, 3, 4, 8}) for (int t : {1, 2}) {
        Case c; c.what = "poison"; c.D = D; c.G = G; c.S = 1500; c.r = std::max(4, D/12); c.k = 96; c.l = 24; c.threads = t;
        run_poison(c, gen);
        c.tkv = GGML_TYPE_F32; c.realloc = false; run_poison(c, gen);
        c.tkv = GGML_TYPE_Q8_0; c.realloc = true; run_poison(c, gen);
    }

    // the portable graph (ggml_sparq_attn_ops), under a sparse mask and over gathered rows, at the
    // shapes of SmolLM2-135M (64, 3 query heads per KV head, 3 KV heads) and Gemma 3 270M (256, 4, 1):
    // one query row that sees every cell, 4 rows of their own lengths (some see fewer than k)
    for (int attend : {0, (int) GGML_SPARQ_GATHER})
    for (int shape : {0, 1})
    for (ggml_type tkv : {GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_F32})
    for (int nb : {1, 4}) {
        Case c; c.what = "ops"; c.ops = attend; c.tkv = tkv; c.nb = nb; c.S = 1500; c.k = 96;
        c.D = shape ? 256 : 64; c.G = shape ? 4 : 3; c.Hkv = shape ? 1 : 3; c.r = c.D/8;
        c.realloc = shape == 1 || nb == 4; c.threads = 1 + nb % 3;
        run_ops(c, gen, nb == 1 ? 0 : 1);
    }
    for (int attend : {0, (int) GGML_SPARQ_GATHER}) {
        Case c; c.what = "ops-no-tau"; c.ops = attend; c.nb = 2; c.S = 1000; c.k = 64; c.no_tau = true;
        run_ops(c, gen, 1);
        c.what = "ops-r=D"; c.no_tau = false; c.r = c.D; run_ops(c, gen, 1);
        c.what = "ops-mul-mat"; c.r = 8; c.ops = attend | GGML_SPARQ_MUL_MAT; c.nb = 3; run_ops(c, gen, 1);
        for (int G : {1, 8}) for (int nb : {1, 2}) {  // learned attention sinks (gpt-oss's shape)
            c.what = "ops-sinks"; c.ops = attend; c.G = G; c.Hkv = 2; c.nb = nb; c.sinks = true; c.realloc = nb == 2;
            run_ops(c, gen, 0);
        }
    }
    // the portable graph's nodes per layer and stream for one query (the default settings: mean
    // reallocation for one query head per KV head only), against a bound
    {
        struct Shape { const char * name; int D, G, Hkv; } shapes[] = {
            { "SmolLM2-135M", 64, 3, 3 }, { "Gemma-3-270M", 256, 4, 1 }, { "Llama-3-8B", 128, 4, 8 }, { "MHA", 64, 1, 12 } };
        const int bound = 24;
        for (const Shape & sh : shapes) for (int attend : {0, (int) GGML_SPARQ_GATHER}) {
            const int flags = attend | GGML_SPARQ_ALL_SEE_K | (sh.G == 1 ? GGML_SPARQ_REALLOC : 0);
            const int n = ops_nodes(sh.D, sh.G, sh.Hkv, 1, flags, false);
            printf("portable graph, %-12s %s: %d nodes\n", sh.name, attend ? "gathered" : "sparse mask", n);
            if (n <= bound) {
                n_pass++;
            } else {
                n_fail++;
                printf("FAIL nodes: %d > %d\n", n, bound);
            }
        }
    }

    printf("test-sparq-op: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
