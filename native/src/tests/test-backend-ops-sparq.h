// sparq-cpp: the test-backend-ops cases of GGML_OP_SPARQ_ATTN and of the portable SparQ graph
// (ggml_sparq_attn_ops). Included by tests/test-backend-ops.cpp (native/patches/0003) after its
// own test cases, whose helpers it uses (test_case, init_tensor_uniform, VARS_TO_STR*, test_top_k,
// test_get_rows); sparq_make_test_cases adds these cases to make_test_cases_eval's list.
#pragma once

// GGML_OP_SPARQ_ATTN
// K^T is made in the graph from K (so the two agree), as a view of a longer buffer (like the cache);
// the I8 K^T (kt_i8) is quantized from K's values when the tensors are initialized.
// Each mask row has its own visible length (several sequences) and random holes.
struct test_sparq_attn : public test_case {
    const int64_t hs;     // head size (K and V)
    const int64_t nh;     // KV heads
    const int64_t G;      // query heads per KV head
    const int64_t nr3;    // streams
    const int64_t kv;     // cache positions
    const int64_t nb;     // query rows (sequences, one token each)
    const int32_t r, k_top, l, flags;
    const ggml_type type_KV;
    const ggml_type type_mask;
    const bool kt_i8;
    const bool sinks;     // learned attention sinks (ggml_sparq_attn_add_sinks)
    const int64_t hsv;    // V head size (MiMo-V2: K 192, V 128)

    std::string vars() override {
        return VARS_TO_STR15(hs, nh, G, nr3, kv, nb, r, k_top, l, flags, type_KV, type_mask, kt_i8, sinks, hsv);
    }

    double max_nmse_err() override {
        return 5e-4;
    }

    test_sparq_attn(int64_t hs = 64, int64_t nh = 2, int64_t G = 3, int64_t nr3 = 1, int64_t kv = 512, int64_t nb = 1,
                    int32_t r = 8, int32_t k_top = 32, int32_t l = 8, int32_t flags = GGML_SPARQ_REALLOC,
                    ggml_type type_KV = GGML_TYPE_F16, ggml_type type_mask = GGML_TYPE_F16, bool kt_i8 = false, bool sinks = false,
                    int64_t hsv = 0)
        : hs(hs), nh(nh), G(G), nr3(nr3), kv(kv), nb(nb), r(r), k_top(k_top), l(l), flags(flags), type_KV(type_KV), type_mask(type_mask),
          kt_i8(kt_i8), sinks(sinks), hsv(hsv > 0 ? hsv : hs) {}

    ggml_tensor * build_graph(ggml_context * ctx) override {
        ggml_tensor * q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, hs, nb, nh*G, nr3);
        ggml_set_name(q, "q");
        ggml_tensor * k0 = ggml_new_tensor_4d(ctx, type_KV, hs, 2*kv, nh, nr3);
        ggml_set_name(k0, "k0");
        ggml_tensor * k = ggml_view_4d(ctx, k0, hs, kv, nh, nr3, k0->nb[1], k0->nb[2], k0->nb[3], 0);
        // K^T like K; for a quantized K, the F16 of its dequantized values (as the cache's mirror)
        ggml_tensor * kt0 = kt_i8 ? ggml_new_tensor_4d(ctx, GGML_TYPE_I8, 2*kv, hs + 1, nh, nr3)
            : ggml_is_quantized(type_KV)
            ? ggml_cast(ctx, ggml_transpose(ctx, ggml_cpy(ctx, k0, ggml_new_tensor(ctx, GGML_TYPE_F32, 4, k0->ne))), GGML_TYPE_F16)
            : ggml_cont(ctx, ggml_transpose(ctx, k0));
        if (kt_i8) {
            ggml_set_name(kt0, "kt0");  // after k0: initialize_tensors fills it from k0
        }
        ggml_tensor * kt = ggml_view_4d(ctx, kt0, kv, kt0->ne[1], nh, nr3, kt0->nb[1], kt0->nb[2], kt0->nb[3], 0);
        ggml_tensor * v0 = ggml_new_tensor_4d(ctx, type_KV, hsv, 2*kv, nh, nr3);
        ggml_set_name(v0, "v0");
        ggml_tensor * v = ggml_view_4d(ctx, v0, hsv, kv, nh, nr3, v0->nb[1], v0->nb[2], v0->nb[3], 0);
        ggml_tensor * vm = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, hsv, nh, nb, nr3);
        ggml_set_name(vm, "vm");
        ggml_tensor * m = ggml_new_tensor_4d(ctx, type_mask, kv, nb, 1, nr3);
        ggml_set_name(m, "m");

        ggml_tensor * out = ggml_sparq_attn(ctx, q, k, kt, v, vm, m, 1.0f/sqrtf(hs), r, k_top, l, flags);
        if (sinks) {
            ggml_tensor * s = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, nh*G);
            ggml_set_name(s, "sinks");
            ggml_sparq_attn_add_sinks(out, s);
        }
        ggml_set_name(out, "out");
        return out;
    }

    void initialize_tensors(ggml_context * ctx) override {
        std::mt19937 gen(1234 + kv + 7*nb + hs);
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t != NULL; t = ggml_get_next_tensor(ctx, t)) {
            if (strcmp(t->name, "m") == 0) {
                std::vector<float> m(ggml_nelements(t));
                std::uniform_int_distribution<int64_t> len(1, kv);
                std::uniform_real_distribution<float> u(0.0f, 1.0f);
                for (int64_t row = 0; row < t->ne[1]*t->ne[3]; ++row) {
                    const int64_t n = row == 0 ? kv : len(gen);
                    for (int64_t i = 0; i < kv; ++i) {
                        m[row*kv + i] = (i < n && u(gen) > 0.1f) ? 0.0f : -INFINITY;
                    }
                }
                if (t->type == GGML_TYPE_F16) {
                    std::vector<ggml_fp16_t> h(m.size());
                    ggml_fp32_to_fp16_row(m.data(), h.data(), m.size());
                    ggml_backend_tensor_set(t, h.data(), 0, h.size()*sizeof(ggml_fp16_t));
                } else {
                    ggml_backend_tensor_set(t, m.data(), 0, m.size()*sizeof(float));
                }
            } else if (strcmp(t->name, "q") == 0) {
                // a few large components per head, as in real queries: what SparQ's step 1 relies on
                init_tensor_uniform(t, -1.0f, 1.0f);
                std::vector<float> qd(ggml_nelements(t));
                ggml_backend_tensor_get(t, qd.data(), 0, qd.size()*sizeof(float));
                std::uniform_int_distribution<int64_t> comp(0, hs - 1);
                for (size_t row = 0; row < qd.size()/hs; ++row) {
                    for (int c = 0; c < 4; ++c) qd[row*hs + comp(gen)] *= 6.0f;
                }
                ggml_backend_tensor_set(t, qd.data(), 0, qd.size()*sizeof(float));
            } else if (strcmp(t->name, "kt0") == 0) {
                // each position's hs components of K quantized together (ggml_sparq_quantize_kt)
                ggml_tensor * k0 = ggml_get_tensor(ctx, "k0");
                std::vector<uint8_t> raw(ggml_nbytes(k0));
                ggml_backend_tensor_get(k0, raw.data(), 0, raw.size());
                const int64_t n_rows = ggml_nrows(k0), n_pos = k0->ne[1];
                std::vector<float> kf(ggml_nelements(k0));
                if (k0->type == GGML_TYPE_F32) {
                    memcpy(kf.data(), raw.data(), raw.size());
                } else {
                    ggml_get_type_traits(k0->type)->to_float(raw.data(), kf.data(), kf.size());
                }
                std::vector<int8_t> kq(ggml_nelements(t));
                for (int64_t p = 0; p < n_pos; ++p) {  // K's rows: head*n_pos + position (nr3 folded in)
                    ggml_sparq_quantize_kt_heads(kf.data() + p*hs, n_pos*hs, hs, n_rows/n_pos, kq.data() + p, n_pos);
                }
                ggml_backend_tensor_set(t, kq.data(), 0, kq.size());
            } else if (strncmp(t->name, "kt0", 3) == 0) {
                // "kt0 (view)": filled with kt0
            } else if (strcmp(t->name, "sinks") == 0) {
                init_tensor_uniform(t, -1.0f, 5.0f);  // as large as the largest scores: a real share
            } else {
                init_tensor_uniform(t, -2.0f, 2.0f);
            }
        }
    }
};

// ggml_sparq_attn_ops (sparq-cpp): the portable SparQ graph of standard ops, compared whole (its
// top-k indices come in no particular order) between a backend and the CPU. Shapes of the cache
// (ns streams): K rows of cells, K^T made from K in the graph; each query row sees a prefix of
// its own length with holes, its local window from the visible ranks (ggml_sparq_window_bias).
// The cases choose k = l (the local window is the selection), so that no near-tie of two
// approximate scores, rounded differently on two backends, can change which rows are read:
// top-k over scores is cased as TOP_K at the same shapes, and the whole path on a real model by
// the Vulkan decode test (tests/test_gpu.py).
struct test_sparq_attn_ops : public test_case {
    const int64_t hs, nh, G, kv, nb;
    const int32_t r, k_top, l, flags;
    const ggml_type type_KV;
    const bool sinks;
    const int64_t ns;

    std::string op_desc(ggml_tensor * t) override {
        GGML_UNUSED(t);
        return "SPARQ_ATTN_OPS";
    }

    std::string vars() override {
        return VARS_TO_STR12(hs, nh, G, kv, nb, r, k_top, l, flags, type_KV, sinks, ns);
    }

    double max_nmse_err() override {
        return 5e-4;
    }

    bool run_whole_graph() override { return true; }

    test_sparq_attn_ops(int64_t hs = 64, int64_t nh = 3, int64_t G = 3, int64_t kv = 2048, int64_t nb = 1,
                        int32_t r = 8, int32_t k_top = 128, int32_t l = 32, int32_t flags = 0, ggml_type type_KV = GGML_TYPE_F16,
                        bool sinks = false, int64_t ns = 1)
        : hs(hs), nh(nh), G(G), kv(kv), nb(nb), r(r), k_top(k_top), l(l), flags(flags), type_KV(type_KV), sinks(sinks), ns(ns) {}

    ggml_tensor * build_graph(ggml_context * ctx) override {
        // as libllama: q [D, n_head, n_tokens] viewed per stream and permuted to [D, nb, n_head, ns]
        ggml_tensor * q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, hs, nh*G, nb, ns);
        ggml_set_name(q, "q");
        q = ggml_permute(ctx, q, 0, 2, 1, 3);
        ggml_tensor * k = ggml_new_tensor_4d(ctx, type_KV, hs, kv, nh, ns);
        ggml_set_name(k, "k");
        ggml_tensor * kt = ggml_is_quantized(type_KV)
            ? ggml_cast(ctx, ggml_transpose(ctx, ggml_cpy(ctx, k, ggml_new_tensor(ctx, GGML_TYPE_F32, 4, k->ne))), GGML_TYPE_F16)
            : ggml_cont(ctx, ggml_transpose(ctx, k));
        ggml_tensor * v = ggml_new_tensor_4d(ctx, type_KV, hs, kv, nh, ns);
        ggml_set_name(v, "v");
        ggml_tensor * vm = nullptr;
        if (flags & GGML_SPARQ_REALLOC) {
            vm = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, hs, nh, nb, ns);
            ggml_set_name(vm, "vm");
        }
        ggml_tensor * m = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, kv, nb, 1, ns);
        ggml_set_name(m, "m");
        ggml_tensor * rank = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, kv, nb, 1, ns);
        ggml_set_name(rank, "rank");
        ggml_tensor * bias = ggml_sparq_window_bias(ctx, m, rank, l);
        ggml_tensor * s = nullptr;
        if (sinks) {
            s = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, nh*G);
            ggml_set_name(s, "sinks");
        }
        ggml_tensor * out = ggml_sparq_attn_ops(ctx, q, k, kt, v, vm, m, bias, s, 1.0f/sqrtf(hs), r, k_top, flags);
        ggml_set_name(out, "out");
        return out;
    }

    void initialize_tensors(ggml_context * ctx) override {
        std::mt19937 gen(4321 + kv + 7*nb + hs);
        std::vector<float> m(kv*nb*ns), rank(kv*nb*ns);
        // every row sees at least k cells where the case says so, else some see fewer
        const int64_t lo = (flags & GGML_SPARQ_ALL_SEE_K) ? std::min<int64_t>(2*k_top, kv) : std::max<int64_t>(1, k_top/2);
        GGML_ASSERT(!(flags & GGML_SPARQ_ALL_SEE_K) || 2*k_top <= kv);
        std::uniform_int_distribution<int64_t> len(lo, kv);
        std::uniform_real_distribution<float> u(0.0f, 1.0f);
        for (int64_t row = 0; row < nb*ns; ++row) {
            const int64_t n = row == 0 ? kv : len(gen);
            float rk = 0.0f;
            for (int64_t i = kv - 1; i >= 0; --i) {
                const bool vis = i < n && (i == n - 1 || u(gen) > 0.1f);
                m[row*kv + i] = vis ? 0.0f : -INFINITY;
                rank[row*kv + i] = vis ? rk : 1e9f;
                rk += vis ? 1.0f : 0.0f;
            }
        }
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t != NULL; t = ggml_get_next_tensor(ctx, t)) {
            if (strcmp(t->name, "m") == 0) {
                std::vector<ggml_fp16_t> h(m.size());
                ggml_fp32_to_fp16_row(m.data(), h.data(), m.size());
                ggml_backend_tensor_set(t, h.data(), 0, h.size()*sizeof(ggml_fp16_t));
            } else if (strcmp(t->name, "rank") == 0) {
                ggml_backend_tensor_set(t, rank.data(), 0, rank.size()*sizeof(float));
            } else if (strcmp(t->name, "q") == 0) {
                // r large components per group, shared by its heads (as in real queries), the rest
                // at most 1/3 of them: the group's top r components are the same on every backend
                init_tensor_uniform(t, -1.0f, 1.0f);
                std::vector<float> qd(ggml_nelements(t));
                ggml_backend_tensor_get(t, qd.data(), 0, qd.size()*sizeof(float));
                std::vector<int64_t> comps(hs);
                for (int64_t grp = 0; grp < ns*nb*nh; ++grp) {
                    std::iota(comps.begin(), comps.end(), 0);
                    std::shuffle(comps.begin(), comps.end(), gen);
                    for (int64_t g = 0; g < G; ++g) {
                        float * row = qd.data() + (grp*G + g)*hs;
                        for (int32_t c = 0; c < r; ++c) {
                            row[comps[c]] = (row[comps[c]] < 0 ? -1.0f : 1.0f)*(3.0f + 0.25f*u(gen));
                        }
                    }
                }
                ggml_backend_tensor_set(t, qd.data(), 0, qd.size()*sizeof(float));
            } else if (strcmp(t->name, "sinks") == 0) {
                init_tensor_uniform(t, -1.0f, 5.0f);
            } else {
                init_tensor_uniform(t, -2.0f, 2.0f);
            }
        }
    }
};

static void sparq_make_test_cases(std::vector<std::unique_ptr<test_case>> & test_cases) {
    // SPARQ_ATTN, fast CPU path against its reference path (-b CPU)
    for (int64_t hs : { 64, 128, 256 }) {
        for (int64_t G : { 1, 3, 4, 8 }) {
            for (int64_t kv : { 113, 1024 }) {
                for (int64_t nb : { 1, 3 }) {
                    test_cases.emplace_back(new test_sparq_attn(hs, 2, G, 1, kv, nb, 8, 32, 8, GGML_SPARQ_REALLOC));
                    test_cases.emplace_back(new test_sparq_attn(hs, 2, G, 1, kv, nb, (int32_t) hs, 16, 0, 0));
                    test_cases.emplace_back(new test_sparq_attn(hs, 2, G, 1, kv, nb, 16, 2048, 0, GGML_SPARQ_REALLOC)); // k >= S: dense
                    test_cases.emplace_back(new test_sparq_attn(hs, 2, G, 1, kv, nb, 8, 64, 64, GGML_SPARQ_REALLOC));  // l = k
                }
            }
        }
    }
    for (ggml_type type_KV : { GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_Q8_0 }) {
        for (ggml_type type_mask : { GGML_TYPE_F16, GGML_TYPE_F32 }) {
            test_cases.emplace_back(new test_sparq_attn(64, 3, 3, 2, 777, 4, 8, 96, 24, GGML_SPARQ_REALLOC, type_KV, type_mask));
            test_cases.emplace_back(new test_sparq_attn(128, 1, 4, 1, 4096, 2, 16, 256, 64, GGML_SPARQ_REALLOC | GGML_SPARQ_NO_TAU, type_KV, type_mask));
        }
    }
    for (ggml_type type_KV : { GGML_TYPE_F16, GGML_TYPE_Q8_0 }) {  // the I8 K^T of the cache's F16 and Q8_0 K
        for (int64_t G : { 1, 3 }) {
            test_cases.emplace_back(new test_sparq_attn(64, 3, G, 2, 777, 4, 8, 96, 24, GGML_SPARQ_REALLOC, type_KV, GGML_TYPE_F16, true));
            test_cases.emplace_back(new test_sparq_attn(256, 1, 4, 1, 2000, 2, 32, 200, 50, 0, type_KV, GGML_TYPE_F32, true));
        }
    }
    test_cases.emplace_back(new test_sparq_attn(64, 1, 1, 1, 1, 1, 8, 32, 8, GGML_SPARQ_REALLOC)); // S = 1
    // head size 512 (Gemma 4's global layers)
    for (int64_t G : { 1, 8 }) {
        test_cases.emplace_back(new test_sparq_attn(512, 1, G, 1, 1024, 2, 64, 64, 16, GGML_SPARQ_REALLOC));
        test_cases.emplace_back(new test_sparq_attn(512, 1, G, 2, 777, 2, 32, 96, 24, 0, GGML_TYPE_Q8_0, GGML_TYPE_F32, true));
        test_cases.emplace_back(new test_sparq_attn(512, 1, G, 1, 300, 2, 64, 1024, 0, GGML_SPARQ_REALLOC)); // dense
    }
    // K and V heads of different sizes (MiMo-V2: 192 and 128)
    for (ggml_type type_KV : { GGML_TYPE_F16, GGML_TYPE_Q8_0 }) {
        for (int64_t G : { 1, 4 }) {
            test_cases.emplace_back(new test_sparq_attn(192, 2, G, 1, 1024, 3, 24, 64, 16, GGML_SPARQ_REALLOC, type_KV, GGML_TYPE_F16, false, false, 128));
            test_cases.emplace_back(new test_sparq_attn(192, 2, G, 2, 777, 2, 24, 96, 24, 0, type_KV, GGML_TYPE_F32, true, true, 128));
            test_cases.emplace_back(new test_sparq_attn(128, 1, G, 1, 700, 2, 16, 1024, 0, GGML_SPARQ_REALLOC, type_KV, GGML_TYPE_F16, false, false, 64)); // dense
        }
    }
    // learned attention sinks (gpt-oss: head size 64, 8 query heads per KV head)
    for (int32_t flags : { 0, (int) GGML_SPARQ_REALLOC }) {
        for (int64_t G : { 1, 8 }) {
            test_cases.emplace_back(new test_sparq_attn(64, 2, G, 1, 1024, 3, 8, 64, 16, flags, GGML_TYPE_F16, GGML_TYPE_F16, false, true));
            test_cases.emplace_back(new test_sparq_attn(64, 2, G, 1, 1024, 3, 16, 2048, 0, flags, GGML_TYPE_F16, GGML_TYPE_F16, false, true)); // dense
            test_cases.emplace_back(new test_sparq_attn(64, 3, G, 2, 777, 4, 8, 96, 24, flags, GGML_TYPE_Q8_0, GGML_TYPE_F32, true, true));
        }
    }
    test_cases.emplace_back(new test_sparq_attn(256, 1, 4, 1, 2000, 8, 32, 200, 50, GGML_SPARQ_REALLOC));

    // the portable graph at the shapes of the two models of the tests: SmolLM2-135M
    // (head size 64, 3 KV heads of 3 query heads) and Gemma 3 270M (256, 1 of 4), compression
    // 1/8 (r = d/8, k = n_kv/16, l = k/4) at 2048 and 8192 cells, one query (it sees every cell)
    // and 4 (some see fewer than k), attending under a sparse mask and over gathered rows
    for (int32_t attend : { 0, (int) GGML_SPARQ_GATHER }) {
        for (ggml_type type_KV : { GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_F32 }) {
            for (int64_t kv : { 2048, 8192 }) {
                for (int64_t nb : { 1, 4 }) {
                    const int32_t k_top = (int32_t) kv/16;
                    const int32_t flags = GGML_SPARQ_REALLOC | attend | (nb == 1 ? (int) GGML_SPARQ_ALL_SEE_K : 0);
                    test_cases.emplace_back(new test_sparq_attn_ops(64, 3, 3, kv, nb, 8, k_top, k_top, flags, type_KV));
                    test_cases.emplace_back(new test_sparq_attn_ops(256, 1, 4, kv, nb, 32, k_top, k_top, flags, type_KV));
                }
            }
        }
        test_cases.emplace_back(new test_sparq_attn_ops(64, 3, 3, 2048, 2, 8, 128, 128, attend));
        test_cases.emplace_back(new test_sparq_attn_ops(64, 3, 3, 2048, 2, 8, 128, 128, attend | GGML_SPARQ_REALLOC | GGML_SPARQ_NO_TAU));
        test_cases.emplace_back(new test_sparq_attn_ops(64, 2, 1, 1024, 3, 64, 1024, 0, attend | GGML_SPARQ_REALLOC)); // k = n_kv, r = d
        test_cases.emplace_back(new test_sparq_attn_ops(64, 3, 3, 2304, 1, 8, 128, 32, attend | GGML_SPARQ_ALL_SEE_K)); // smollm2 at 2049 cells
    }
    for (int32_t flags : { 0, (int) GGML_SPARQ_REALLOC }) {  // learned attention sinks (gpt-oss's shape)
        test_cases.emplace_back(new test_sparq_attn_ops(64, 2, 8, 2048, 2, 8, 128, 128, flags, GGML_TYPE_F16, true));
        test_cases.emplace_back(new test_sparq_attn_ops(64, 1, 8, 2048, 1, 8, 128, 128, flags | GGML_SPARQ_GATHER | GGML_SPARQ_ALL_SEE_K,
                                                        GGML_TYPE_F16, true));
    }
    // the ops it uses, at those shapes: top-k over the cells and over the components, rows of
    // the mirror, of K and of V gathered
    for (int64_t kv : { 2048, 8192 }) {
        test_cases.emplace_back(new test_top_k(GGML_TYPE_F32, {kv, 4, 3, 1}, (int) kv/16));
        test_cases.emplace_back(new test_top_k(GGML_TYPE_F32, {kv, 4, 1, 1}, (int) kv/16));
        for (ggml_type type : { GGML_TYPE_F16, GGML_TYPE_Q8_0 }) {
            test_cases.emplace_back(new test_get_rows(type, 64, kv, (int) kv/16*4, 3, 1, false, false));
            test_cases.emplace_back(new test_get_rows(type, 256, kv, (int) kv/16*4, 1, 1, false, false));
        }
        test_cases.emplace_back(new test_get_rows(GGML_TYPE_F16, kv, 64, 8*4, 3, 1, false, false));
        test_cases.emplace_back(new test_get_rows(GGML_TYPE_F16, kv, 256, 32*4, 1, 1, false, false));
    }
    test_cases.emplace_back(new test_top_k(GGML_TYPE_F32, {64, 4, 3, 1}, 8));
    test_cases.emplace_back(new test_top_k(GGML_TYPE_F32, {256, 4, 1, 1}, 32));
}
