// sparq-cpp: times GGML_OP_SPARQ_ATTN against both dense attention paths of ggml on the CPU, in
// one run, on the same data: ggml_flash_attn_ext, and mul_mat + soft_max_ext + mul_mat over a
// transposed V (llama.cpp's path with flash attention off). One query token, F16 K/V. SparQ runs
// as libllama plans a layer of that shape (llama_sparq_plan_layer: r, k, l, the K^T mirror's type,
// mean reallocation by model family) and reads the mirror libllama would keep (int8 by default).
//
//   bench-sparq-op [--threads N] [--reps N] [--ctx 1024,4096,...] [--dims 64:3:3,128:4:8]
//                  [--compression 8,16] [--mirror auto|float] [--cold]   (--compression: c of each budget 1/c)
//
// --dims takes head_dim:group_size:n_head_kv triples. Prints one JSON object per line (a result
// per configuration, and first the machine's measured read bandwidth); scripts/bench_op.py turns
// them into a table, JSON and a plot.

#include "ggml.h"
#include "ggml-cpu.h"
#include "llama-sparq.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using clk = std::chrono::steady_clock;

// comma-separated whole numbers >= 1; anything else is refused (exit 2), never read as another number
std::vector<int> parse_ints(const char * flag, const char * s) {
    std::vector<int> out;
    for (const char * p = s; *p; ) {
        char * end = nullptr;
        const long v = strtol(p, &end, 10);
        if (end == p || (*end != ',' && *end != '\0') || v < 1 || v > INT32_MAX) {
            fprintf(stderr, "%s takes whole numbers >= 1, comma-separated, got '%s'\n", flag, s);
            exit(2);
        }
        out.push_back((int) v);
        p = *end == ',' ? end + 1 : end;
    }
    return out;
}

struct Dims { int D, G, Hkv; };

// read bandwidth: threads each sum a disjoint part of a large buffer
double read_bandwidth_gbs(int threads) {
    const size_t n = (size_t) 256 << 20;  // bytes
    std::vector<float> buf(n / sizeof(float), 1.0f);
    double best_s = 1e9;
    for (int rep = 0; rep < 5; ++rep) {
        std::vector<std::thread> th;
        std::vector<double> sums(threads);
        auto t0 = clk::now();
        for (int t = 0; t < threads; ++t) {
            th.emplace_back([&, t]() {
                const size_t per = buf.size() / threads;
                const float * p = buf.data() + t*per;
                float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
                for (size_t i = 0; i + 8 <= per; i += 8) {
                    a0 += p[i]; a1 += p[i+1]; a2 += p[i+2]; a3 += p[i+3];
                    a4 += p[i+4]; a5 += p[i+5]; a6 += p[i+6]; a7 += p[i+7];
                }
                sums[t] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
            });
        }
        for (auto & x : th) x.join();
        const double s = std::chrono::duration<double>(clk::now() - t0).count();
        if (sums[0] < 0) printf("#\n");  // keep the sums alive
        best_s = std::min(best_s, s);
    }
    return n / best_s / 1e9;
}

struct Runner {
    ggml_threadpool * tp;
    int threads;
    std::vector<uint8_t> work;
    bool cold = false;                 // evict the caches before every timed run
    std::vector<uint64_t> evict;       // 3x the last-level cache, written before each run

    void evict_caches() {
        if (evict.empty()) evict.resize((size_t) 96 << 17);  // 96 MiB
        for (size_t i = 0; i < evict.size(); i += 8) evict[i] += 1;
    }

    double median_ms(ggml_cgraph * gf, int reps) {
        ggml_cplan plan = ggml_graph_plan(gf, threads, tp);
        work.resize(plan.work_size + 64);
        plan.work_data = work.data();
        for (int i = 0; i < 3; ++i) ggml_graph_compute(gf, &plan);
        std::vector<double> ts;
        for (int i = 0; i < reps; ++i) {
            if (cold) evict_caches();
            auto t0 = clk::now();
            ggml_graph_compute(gf, &plan);
            ts.push_back(std::chrono::duration<double, std::milli>(clk::now() - t0).count());
        }
        std::sort(ts.begin(), ts.end());
        return ts[ts.size()/2];
    }
};

// nodes of a graph that do work (views, reshapes and permutes do none): what a GPU launches
int work_nodes(ggml_cgraph * gf) {
    int n = 0;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        switch (ggml_graph_node(gf, i)->op) {
            case GGML_OP_NONE: case GGML_OP_VIEW: case GGML_OP_RESHAPE: case GGML_OP_PERMUTE: case GGML_OP_TRANSPOSE: break;
            default: ++n;
        }
    }
    return n;
}

// SPARQ_BENCH_PROFILE=1: each node's own median time (its inputs as the whole graph left them), to stderr
void profile_nodes(Runner & run, ggml_context * ctx, ggml_cgraph * gf, int reps, const char * name) {
    if (getenv("SPARQ_BENCH_PROFILE") == nullptr) {
        return;
    }
    run.median_ms(gf, 1);
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * t = ggml_graph_node(gf, i);
        ggml_cgraph * one = ggml_new_graph_custom(ctx, 1, false);
        ggml_graph_add_node(one, t);
        const double ms = run.median_ms(one, reps);
        if (ms > 0.002) {
            fprintf(stderr, "%s %3d %-14s %-28s %8.4f ms  [%lld %lld %lld %lld]\n", name, i, ggml_op_desc(t), t->name, ms,
                    (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2], (long long) t->ne[3]);
        }
    }
}

void fill_f16(ggml_tensor * t, std::mt19937 & gen) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int64_t n = ggml_nelements(t);
    std::vector<float> f(n);
    for (auto & x : f) x = nd(gen);
    ggml_fp32_to_fp16_row(f.data(), (ggml_fp16_t *) t->data, n);
}

} // namespace

int main(int argc, char ** argv) {
    int threads = 2, reps = 20;
    bool cold = false;
    std::vector<int> ctxs = {1024, 4096, 8192, 16384, 32768};
    std::vector<int> comps = {8, 16};
    std::vector<Dims> dims = {{64, 3, 3}, {128, 4, 8}};
    int mirror = LLAMA_SPARQ_MIRROR_AUTO;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() { if (i + 1 >= argc) { fprintf(stderr, "missing value for %s\n", a.c_str()); exit(2); } return argv[++i]; };
        if (a == "--threads") threads = atoi(next());
        else if (a == "--reps") reps = atoi(next());
        else if (a == "--ctx") ctxs = parse_ints("--ctx", next());
        else if (a == "--compression") comps = parse_ints("--compression", next());  // c of budget 1/c
        else if (a == "--cold") cold = true;
        else if (a == "--mirror") {
            const std::string m = next();
            if (m != "auto" && m != "float") { fprintf(stderr, "--mirror takes auto or float, got '%s'\n", m.c_str()); return 2; }
            mirror = m == "auto" ? LLAMA_SPARQ_MIRROR_AUTO : LLAMA_SPARQ_MIRROR_FLOAT;
        }
        else if (a == "--dims") {
            dims.clear();
            std::string s = next();
            size_t pos = 0;
            while (pos < s.size()) {
                size_t e = s.find(',', pos); if (e == std::string::npos) e = s.size();
                Dims d; sscanf(s.substr(pos, e - pos).c_str(), "%d:%d:%d", &d.D, &d.G, &d.Hkv);
                dims.push_back(d); pos = e + 1;
            }
        } else { fprintf(stderr, "unknown argument %s\n", a.c_str()); return 2; }
    }
    ggml_cpu_init();
    printf("{\"kind\": \"machine\", \"threads\": %d, \"read_gbs\": %.2f}\n", threads, read_bandwidth_gbs(threads));
    fflush(stdout);

    ggml_threadpool_params tpp = ggml_threadpool_params_default(threads);
    Runner run{ggml_threadpool_new(&tpp), threads, {}};
    run.cold = cold;
    std::mt19937 gen(7);

    for (const Dims & dm : dims) {
        for (int S : ctxs) {
            const int D = dm.D, H = dm.G*dm.Hkv, Hkv = dm.Hkv;
            const size_t kvb = (size_t) S*D*Hkv*2;
            ggml_init_params ip = { 5*kvb + (size_t) 64*S*H + ((size_t) 256 << 20), nullptr, false };
            ggml_context * ctx = ggml_init(ip);
            ggml_tensor * q  = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, D, 1, H, 1);
            ggml_tensor * k  = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, D, S, Hkv, 1);
            ggml_tensor * v  = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, D, S, Hkv, 1);
            ggml_tensor * vt = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, S, D, Hkv, 1);
            ggml_tensor * vm = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, D, Hkv, 1, 1);
            ggml_tensor * m16 = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, S, 1, 1, 1);
            ggml_tensor * m32 = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, S, 1, 1, 1);
            {
                std::normal_distribution<float> nd(0.0f, 1.0f);
                for (int64_t i = 0; i < ggml_nelements(q); ++i) ((float *) q->data)[i] = nd(gen);
                for (int64_t i = 0; i < ggml_nelements(vm); ++i) ((float *) vm->data)[i] = nd(gen) * 0.1f;
                fill_f16(k, gen); fill_f16(v, gen);
                // V^T holds the same values as V
                const ggml_fp16_t * vd = (const ggml_fp16_t *) v->data;
                for (int g = 0; g < Hkv; ++g) for (int p = 0; p < S; ++p) for (int j = 0; j < D; ++j) {
                    ((ggml_fp16_t *) vt->data)[((size_t) g*D + j)*S + p] = vd[((size_t) g*S + p)*D + j];
                }
                for (int p = 0; p < S; ++p) { ((ggml_fp16_t *) m16->data)[p] = ggml_fp32_to_fp16(0.0f); ((float *) m32->data)[p] = 0.0f; }
            }
            const float scale = 1.0f / std::sqrt((float) D);

            ggml_tensor * fa = ggml_flash_attn_ext(ctx, q, k, v, m16, scale, 0.0f, 0.0f);
            ggml_prec_set_acc(fa, GGML_PREC_F32);
            ggml_cgraph * g_fa = ggml_new_graph(ctx);
            ggml_build_forward_expand(g_fa, fa);

            ggml_tensor * kq = ggml_mul_mat(ctx, k, q);                   // [S, 1, H]
            kq = ggml_soft_max_ext(ctx, kq, m32, scale, 0.0f);
            ggml_tensor * kqv = ggml_mul_mat(ctx, vt, kq);                // [D, 1, H]
            ggml_cgraph * g_mm = ggml_new_graph(ctx);
            ggml_build_forward_expand(g_mm, kqv);

            // SPARQ_BENCH_ONLY_SPARQ=1: skip the dense timings (for profiling the op alone)
            const bool only_sparq = getenv("SPARQ_BENCH_ONLY_SPARQ") != nullptr;
            const double t_fa = only_sparq ? 0.0 : run.median_ms(g_fa, reps);
            const double t_mm = only_sparq ? 0.0 : run.median_ms(g_mm, reps);
            profile_nodes(run, ctx, g_mm, reps, "dense-mul-mat");
            // mean reallocation as libllama defaults it: on for multi-head, off for grouped-query layers
            const bool realloc = dm.G == 1;
            // K^T: the same values as K, as F16 or as libllama's I8 mirror, each made when first needed
            ggml_tensor * kts[2] = { nullptr, nullptr };
            auto kt_of = [&](bool i8) {
                ggml_tensor *& kt = kts[i8];
                if (kt != nullptr) {
                    return kt;
                }
                const ggml_fp16_t * kd = (const ggml_fp16_t *) k->data;
                if (i8) {
                    kt = ggml_new_tensor_4d(ctx, GGML_TYPE_I8, S, D + 1, Hkv, 1);
                    std::vector<float> kf((size_t) Hkv*S*D);
                    ggml_fp16_to_fp32_row(kd, kf.data(), (int64_t) kf.size());
                    for (int p = 0; p < S; ++p) {
                        ggml_sparq_quantize_kt_heads(&kf[(size_t) p*D], (size_t) S*D, D, Hkv, (int8_t *) kt->data + p, S);
                    }
                } else {
                    kt = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, S, D, Hkv, 1);
                    for (int g = 0; g < Hkv; ++g) for (int p = 0; p < S; ++p) for (int j = 0; j < D; ++j) {
                        ((ggml_fp16_t *) kt->data)[((size_t) g*D + j)*S + p] = kd[((size_t) g*S + p)*D + j];
                    }
                }
                return kt;
            };

            for (int c : comps) {
                llama_sparq_params sp = llama_sparq_default_params();
                sp.compression = 1.0f / c;
                sp.mean_realloc = realloc ? 1 : 0;
                sp.min_ctx = 0;
                sp.mirror = mirror;
                llama_sparq_layer_plan plan;
                const int32_t st = llama_sparq_plan_layer(&sp, H, Hkv, D, D, GGML_TYPE_F16, GGML_TYPE_F16, true, S, &plan);
                if (st != LLAMA_SPARQ_OK || plan.path != 1) {
                    fprintf(stderr, "budget 1/%d at D %d, context %d: %s\n", c, D, S,
                            st != LLAMA_SPARQ_OK ? llama_sparq_strerror(st) : "SparQ would read every row (dense)");
                    continue;
                }
                const bool i8 = plan.type_kt == GGML_TYPE_I8;
                ggml_tensor * kt = kt_of(i8);
                ggml_tensor * sq = ggml_sparq_attn(ctx, q, k, kt, v, realloc ? vm : nullptr, m16, scale, plan.r, plan.k,
                                                   plan.l, realloc ? GGML_SPARQ_REALLOC : 0);
                ggml_cgraph * g_sq = ggml_new_graph(ctx);
                ggml_build_forward_expand(g_sq, sq);
                const double t_sq = run.median_ms(g_sq, reps);

                // the portable graph as libllama plans it for a layer without the fused op (F16
                // mirror), attending under a sparse mask and over gathered rows
                llama_sparq_layer_plan po;
                double t_ops[2] = { -1.0, -1.0 };
                int nodes_ops[2] = { 0, 0 };
                if (llama_sparq_plan_layer(&sp, H, Hkv, D, D, GGML_TYPE_F16, GGML_TYPE_F16, false, S, &po) == LLAMA_SPARQ_OK &&
                    po.path == 2 && po.type_kt == GGML_TYPE_F16) {
                    ggml_tensor * kt16 = kt_of(false);
                    // the window bias, made once per graph by libllama: here a leaf with its values
                    ggml_tensor * rank = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, S, 1, 1, 1);
                    for (int p = 0; p < S; ++p) ((float *) rank->data)[p] = (float) (S - 1 - p);
                    ggml_tensor * b = ggml_sparq_window_bias(ctx, m16, rank, po.l);
                    ggml_cgraph * g_b = ggml_new_graph(ctx);
                    ggml_build_forward_expand(g_b, b);
                    run.median_ms(g_b, 1);
                    ggml_tensor * bias = ggml_dup_tensor(ctx, b);
                    memcpy(bias->data, b->data, ggml_nbytes(b));
                    for (int gather = 0; gather < 2; ++gather) {
                        const int32_t flags = (realloc ? GGML_SPARQ_REALLOC : 0) | GGML_SPARQ_ALL_SEE_K | (gather ? GGML_SPARQ_GATHER : 0);
                        ggml_tensor * so = ggml_sparq_attn_ops(ctx, q, k, kt16, v, realloc ? vm : nullptr, m16, bias, nullptr,
                                                               scale, po.r, po.k, flags);
                        ggml_cgraph * g_so = ggml_new_graph(ctx);
                        ggml_build_forward_expand(g_so, so);
                        t_ops[gather] = run.median_ms(g_so, reps);
                        nodes_ops[gather] = work_nodes(g_so);
                        profile_nodes(run, ctx, g_so, reps, gather ? "ops-gather" : "ops-mask");
                    }
                }
                // the mask's row (F16) besides what the plan counts
                printf("{\"kind\": \"op\", \"head_dim\": %d, \"group\": %d, \"n_head_kv\": %d, \"ctx\": %d, "
                       "\"compression\": \"1/%d\", \"r\": %d, \"k\": %d, \"l\": %d, \"mirror\": \"%s\", \"realloc\": %s, "
                       "\"ms_sparq\": %.4f, \"ms_flash_attn\": %.4f, \"ms_mul_mat\": %.4f, "
                       "\"bytes_sparq\": %.0f, \"bytes_dense\": %.0f, "
                       "\"ms_ops_mask\": %.4f, \"ms_ops_gather\": %.4f, \"nodes_ops_mask\": %d, \"nodes_ops_gather\": %d, "
                       "\"nodes_flash_attn\": %d, \"nodes_mul_mat\": %d}\n",
                       D, dm.G, Hkv, S, c, plan.r, plan.k, plan.l, ggml_type_name((ggml_type) plan.type_kt),
                       realloc ? "true" : "false", t_sq, t_fa, t_mm, plan.bytes + 2.0*S, plan.bytes_dense + 2.0*S,
                       t_ops[0], t_ops[1], nodes_ops[0], nodes_ops[1], work_nodes(g_fa), work_nodes(g_mm));
                fflush(stdout);
            }
            ggml_free(ctx);
        }
    }
    ggml_threadpool_free(run.tp);
    return 0;
}
