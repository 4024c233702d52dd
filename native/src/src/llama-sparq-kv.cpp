// sparq-cpp: the SparQ state of one KV cache: allocating the K^T mirror, rebuilding it from K,
// keeping the running V sums, and checking both against the cache. See llama-sparq-kv.h.
#include "llama-sparq-kv.h"
#include "llama-sparq-impl.h"

#include "llama-impl.h"
#include "llama-kv-cache.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

ggml_type llama_sparq_mirror_type(ggml_type type_k, bool i8) {
    return i8 ? GGML_TYPE_I8 : type_k == GGML_TYPE_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
}

// an I8 mirror's head size and head count, from its rows (n_head_kv*(d + 1)) and K's width (n_head_kv*d)
static void i8_dims(const ggml_tensor * t, int64_t n_embd, int64_t & d, int64_t & n_head) {
    n_head = t->ne[1] - n_embd;
    d = n_embd/n_head;
}

// the I8 mirror's columns of n cells (one row of K each, n_embd values in f32), quantized per
// head: out holds the mirror's n_head*(d + 1) rows of n bytes
static void quantize_cells(const float * kf, int64_t n, int64_t n_embd, int64_t d, int64_t n_head, int8_t * out) {
    for (int64_t c = 0; c < n; ++c) {
        ggml_sparq_quantize_kt_heads(kf + c*n_embd, d, d, n_head, out + c, n);
    }
}

// f(stream, cell) for every cell of the cache that holds a token
template <typename F>
static void for_each_cell(const llama_kv_cache & kv, F && f) {
    for (uint32_t s = 0; s < kv.get_n_stream(); ++s) {
        const auto & cells = cache_internals::cells(kv, s);
        for (uint32_t c = 0; c < cells.used_max_p1(); ++c) {
            if (!cells.is_empty(c)) {
                f(s, c);
            }
        }
    }
}

// n_rows contiguous K or V rows of n values each, in f32
static void rows_f32(ggml_type type, const void * src, int64_t n_rows, int64_t n, float * dst) {
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, (size_t) n_rows*n*sizeof(float));
    } else {
        ggml_get_type_traits(type)->to_float(src, dst, n_rows*n);
    }
}

// row `offs` (bytes) of a V cache tensor, as fp32 in `row`
static void v_row_f32(const ggml_tensor * v, size_t offs, std::vector<uint8_t> & raw, std::vector<float> & row) {
    const int64_t n = v->ne[0];
    const void * src;
    if (ggml_backend_buffer_is_host(v->buffer)) {
        src = (const char *) v->data + offs;
    } else {
        raw.resize(v->nb[1]);
        ggml_backend_tensor_get(v, raw.data(), offs, v->nb[1]);
        src = raw.data();
    }
    row.resize(n);
    rows_f32(v->type, src, 1, n, row.data());
}

llama_sparq_kv::~llama_sparq_kv() {
    if (enabled && stats.n_tokens_sparq == 0 && stats.n_tokens_dense > 0) {
        // said where every tool shows it: SparQ was asked for and never ran
        LLAMA_LOG_WARN("llama_sparq: SparQ was on but decoded no token: every sequence stayed below min_ctx (%d), "
                       "the length from which it replaces dense attention, or took only prompt batches\n", min_ctx);
    }
    if (stats.n_tokens_sparq + stats.n_tokens_dense > 0) {
        LLAMA_LOG_INFO("llama_sparq: %lld tokens decoded with SparQ attention, %lld densely (context below min ctx, prefill); "
                       "SparQ layers read %.3f of dense attention's K/V bytes\n",
                       (long long) stats.n_tokens_sparq, (long long) stats.n_tokens_dense,
                       stats.bytes_attn_dense > 0 ? stats.bytes_attn_sparq / stats.bytes_attn_dense : 0.0);
    }
}

void llama_sparq_kv_invalidate(llama_kv_cache * kv, bool k_changed, bool v_changed) {
    if (kv == nullptr || !kv->sparq) {
        return;
    }
    kv->sparq->k_dirty |= k_changed;
    kv->sparq->v_dirty |= v_changed;
}

void llama_sparq_kv::free_mirror() {
    kt.clear();
    vsum_off.clear();
    ctxs_bufs.clear();
    n_eligible = 0;
    vsum_size  = 0;
}

void llama_sparq_kv::reset_sums() {
    in_sum.clear();
    vsum.clear();
    count.clear();
    hi.clear();
}

bool llama_sparq_kv::allocate(const llama_kv_cache & kv, const std::vector<ggml_type> & types) {
    free_mirror();
    const size_t n_layers = cache_internals::n_layers(kv);
    kt.assign(n_layers, nullptr);
    vsum_off.assign(n_layers, 0);

    std::map<ggml_backend_buffer_type_t, ggml_context_ptr> ctxs;
    for (size_t ikv = 0; ikv < n_layers; ++ikv) {
        if (types[ikv] == GGML_TYPE_COUNT) {
            continue;
        }
        ggml_tensor * k = cache_internals::k(kv, ikv);
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(k->buffer);
        auto it = ctxs.find(buft);
        if (it == ctxs.end()) {
            ggml_init_params ip = { n_layers*ggml_tensor_overhead(), nullptr, true };
            it = ctxs.emplace(buft, ggml_context_ptr(ggml_init(ip))).first;
        }
        const int64_t n_head_kv = cache_internals::hparams(kv).n_head_kv(cache_internals::il(kv, ikv));
        const int64_t rows = types[ikv] == GGML_TYPE_I8 ? k->ne[0] + n_head_kv : k->ne[0];  // I8: + an exponent row per head
        ggml_tensor * t = ggml_new_tensor_3d(it->second.get(), types[ikv], k->ne[1], rows, k->ne[2]);
        ggml_format_name(t, "sparq_kt_l%d", cache_internals::il(kv, ikv));
        kt[ikv] = t;
        vsum_off[ikv] = vsum_size;
        vsum_size += cache_internals::v(kv, ikv)->ne[0];
        n_eligible++;
    }
    for (auto & [buft, ctx] : ctxs) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft);
        if (buf == nullptr) {
            free_mirror();
            return false;
        }
        ggml_backend_buffer_clear(buf, 0);
        ctxs_bufs.emplace_back(std::move(ctx), ggml_backend_buffer_ptr(buf));
    }
    k_dirty = true;
    v_dirty = true;
    return true;
}

void llama_sparq_kv::rebuild_mirror(const llama_kv_cache & kv) {
    const uint32_t kv_size = kv.get_size();
    std::vector<uint8_t> kbuf, tbuf;
    std::vector<float> kf;
    for_each_layer([&](size_t ikv, ggml_tensor * t) {
        ggml_tensor * k = cache_internals::k(kv, ikv);
        const size_t ts = ggml_type_size(t->type);
        const int64_t n_embd = k->ne[0];
        for (uint32_t s = 0; s < kv.get_n_stream(); ++s) {
            const uint32_t n = cache_internals::cells(kv, s).used_max_p1();
            if (n == 0) {
                continue;
            }
            kbuf.resize((size_t) n*k->nb[1]);
            ggml_backend_tensor_get(k, kbuf.data(), (size_t) s*kv_size*k->nb[1], kbuf.size());
            if (t->type == GGML_TYPE_I8) {  // K's values (as cached) quantized per position and head
                int64_t d, n_head;
                i8_dims(t, n_embd, d, n_head);
                kf.resize((size_t) n*n_embd);
                rows_f32(k->type, kbuf.data(), n, n_embd, kf.data());
                tbuf.resize((size_t) n*t->ne[1]);
                quantize_cells(kf.data(), n, n_embd, d, n_head, (int8_t *) tbuf.data());
                for (int64_t j = 0; j < t->ne[1]; ++j) {
                    ggml_backend_tensor_set(t, tbuf.data() + (size_t) j*n, ((size_t) s*t->ne[1] + j)*kv_size, n);
                }
                continue;
            }
            if (k->type != t->type) {  // quantized K: its values in f32, then the mirror's type (F16)
                kf.resize((size_t) n*n_embd);
                rows_f32(k->type, kbuf.data(), n, n_embd, kf.data());
                kbuf.resize(kf.size()*ts);
                ggml_fp32_to_fp16_row(kf.data(), (ggml_fp16_t *) kbuf.data(), (int64_t) kf.size());
            }
            const size_t row = (size_t) n_embd*ts;  // bytes of one cell's K in kbuf
            tbuf.resize((size_t) n*ts);
            for (int64_t j = 0; j < n_embd; ++j) {
                for (uint32_t c = 0; c < n; ++c) {
                    memcpy(tbuf.data() + c*ts, kbuf.data() + c*row + j*ts, ts);
                }
                ggml_backend_tensor_set(t, tbuf.data(), ((size_t) s*n_embd + j)*kv_size*ts, tbuf.size());
            }
        }
    });
}

void llama_sparq_kv::add_row(const llama_kv_cache & kv, uint32_t strm, uint32_t cell, llama_seq_id s, float sign) {
    const uint32_t kv_size = kv.get_size();
    std::vector<float> row;
    std::vector<uint8_t> raw;
    double * sum = vsum[s].data();
    for_each_layer([&](size_t ikv, ggml_tensor *) {
        ggml_tensor * v = cache_internals::v(kv, ikv);
        v_row_f32(v, ((size_t) strm*kv_size + cell)*v->nb[1], raw, row);
        double * dst = sum + vsum_off[ikv];
        for (int64_t j = 0; j < v->ne[0]; ++j) {
            dst[j] += sign*row[j];
        }
    });
    count[s] += sign > 0 ? 1 : -1;
}

void llama_sparq_kv::sync_sums(const llama_kv_cache & kv, const llama_kv_cache::slot_info & sinfo, const llama_ubatch & ub,
                               float * vsum_out, float * inv_cnt_out, std::vector<int64_t> & n_vis) {
    const uint32_t kv_size = kv.get_size();
    if (v_dirty) {
        reset_sums();
        v_dirty = false;
    }
    const size_t n_seq = kv.get_n_seq_max(); // batches are validated against it
    if (vsum.size() != n_seq) {
        in_sum.assign(n_seq, {});
        vsum.assign(n_seq, {});
        count.assign(n_seq, 0);
        hi.assign(n_seq, 0);
    }

    // the cells this ubatch writes, per stream; any sum holding them lets go first
    std::vector<std::vector<uint8_t>> written(kv.get_n_stream());
    for (uint32_t s = 0; s < sinfo.n_stream(); ++s) {
        const uint32_t strm = sinfo.strm[s];
        written[strm].assign(kv_size, 0);
        for (uint32_t cell : sinfo.idxs[s]) {
            written[strm][cell] = 1;
            for (size_t q = 0; q < n_seq; ++q) {
                if (!in_sum[q].empty() && kv.get_stream(q) == strm && in_sum[q][cell]) {
                    add_row(kv, strm, cell, q, -1.0f);
                    in_sum[q][cell] = 0;
                }
            }
        }
    }
    if (vsum_out == nullptr) {
        return;
    }

    for (uint32_t i = 0; i < ub.n_tokens; ++i) {
        const llama_seq_id q = ub.seq_id[i][0];
        const llama_pos    p = ub.pos[i];
        const uint32_t strm = kv.get_stream(q);
        const auto & cells = cache_internals::cells(kv, strm);
        if (in_sum[q].empty()) {
            in_sum[q].assign(kv_size, 0);
            vsum[q].assign(vsum_size, 0.0);
        }
        auto & flags = in_sum[q];
        const auto & wr = written[strm];
        const uint32_t top = std::max(hi[q], cells.used_max_p1());
        for (uint32_t c = 0; c < top; ++c) {
            const bool want = !(wr.size() && wr[c]) && !cells.is_empty(c) && cells.seq_has(c, q) && cells.pos_get(c) <= p;
            if (want != (bool) flags[c]) {
                add_row(kv, strm, c, q, want ? 1.0f : -1.0f);
                flags[c] = want;
            }
        }
        hi[q] = top;
        std::copy(vsum[q].begin(), vsum[q].end(), vsum_out + (size_t) i*vsum_size);  // fp64 -> fp32
        inv_cnt_out[i] = 1.0f/(float) (count[q] + 1);
        n_vis[i] = count[q] + 1;
    }
}

int64_t llama_sparq_kv::check(const llama_kv_cache & kv, float * max_rel_err_v) const {
    const uint32_t kv_size = kv.get_size();
    int64_t n_bad = 0;
    std::vector<uint8_t> kbuf, tbuf, vbuf;
    std::vector<float> row, kf, tf;
    for_each_layer([&](size_t ikv, ggml_tensor * t) {
        ggml_tensor * k = cache_internals::k(kv, ikv);
        const int64_t n_embd = k->ne[0];
        kbuf.resize(ggml_nbytes(k));
        tbuf.resize(ggml_nbytes(t));
        ggml_backend_tensor_get(k, kbuf.data(), 0, kbuf.size());
        ggml_backend_tensor_get(t, tbuf.data(), 0, tbuf.size());
        if (t->type == GGML_TYPE_I8) {
            // the mirror holds K's values (as cached) quantized: byte for byte
            int64_t d, n_head;
            i8_dims(t, n_embd, d, n_head);
            kf.resize((size_t) n_embd);
            std::vector<int8_t> col((size_t) t->ne[1]);
            for_each_cell(kv, [&](uint32_t s, uint32_t c) {
                rows_f32(k->type, kbuf.data() + ((size_t) s*kv_size + c)*k->nb[1], 1, n_embd, kf.data());
                quantize_cells(kf.data(), 1, n_embd, d, n_head, col.data());
                for (int64_t j = 0; j < t->ne[1]; ++j) {
                    n_bad += (int8_t) tbuf[((size_t) s*t->ne[1] + j)*kv_size + c] != col[j];
                }
            });
            return;
        }
        if (k->type == t->type) {
            // the mirror holds K's own values: bit for bit
            const size_t ts = ggml_type_size(k->type);
            for_each_cell(kv, [&](uint32_t s, uint32_t c) {
                for (int64_t j = 0; j < n_embd; ++j) {
                    const uint8_t * a = kbuf.data() + ((size_t) s*kv_size + c)*k->nb[1] + j*ts;
                    const uint8_t * b = tbuf.data() + (((size_t) s*n_embd + j)*kv_size + c)*ts;
                    n_bad += memcmp(a, b, ts) != 0;
                }
            });
            return;
        }
        // quantized K, F16 mirror written from the same unquantized K: they agree to within half a
        // quantization step of K's block (its largest |value| / 127 for Q8_0) plus f16 rounding
        kf.resize((size_t) n_embd);
        tf.resize(ggml_nelements(t));
        rows_f32(t->type, tbuf.data(), ggml_nrows(t), t->ne[0], tf.data());
        const int64_t blk = ggml_blck_size(k->type);
        for_each_cell(kv, [&](uint32_t s, uint32_t c) {
            rows_f32(k->type, kbuf.data() + ((size_t) s*kv_size + c)*k->nb[1], 1, n_embd, kf.data());
            for (int64_t j0 = 0; j0 < n_embd; j0 += blk) {
                float amax = 0.0f;
                for (int64_t j = j0; j < j0 + blk; ++j) amax = std::max(amax, std::fabs(kf[j]));
                for (int64_t j = j0; j < j0 + blk; ++j) {
                    const float m = tf[((size_t) s*n_embd + j)*kv_size + c];
                    const float tol = 0.5f*amax/127.0f*1.01f + std::fabs(kf[j])/1024.0f + 1e-6f;
                    n_bad += !(std::fabs(m - kf[j]) <= tol);
                }
            }
        });
    });

    float max_err = 0.0f;
    for (size_t q = 0; q < in_sum.size(); ++q) {
        if (in_sum[q].empty()) {
            continue;
        }
        const uint32_t strm = kv.get_stream(q);
        std::vector<double> fresh(vsum_size, 0.0);
        for (uint32_t c = 0; c < kv_size; ++c) {
            if (!in_sum[q][c]) {
                continue;
            }
            for_each_layer([&](size_t ikv, ggml_tensor *) {
                ggml_tensor * v = cache_internals::v(kv, ikv);
                v_row_f32(v, ((size_t) strm*kv_size + c)*v->nb[1], vbuf, row);
                for (int64_t j = 0; j < v->ne[0]; ++j) {
                    fresh[vsum_off[ikv] + j] += row[j];
                }
            });
        }
        for (size_t j = 0; j < vsum_size; ++j) {
            const double fed = (float) vsum[q][j];  // what the op gets
            max_err = std::max(max_err, (float) (std::fabs(fed - fresh[j])/(1.0 + std::fabs(fresh[j]))));
        }
    }
    if (max_rel_err_v != nullptr) {
        *max_rel_err_v = max_err;
    }
    return n_bad;
}

int64_t llama_sparq_kv::extra_bytes() const {
    int64_t extra = 0;
    for (const auto & [_, buf] : ctxs_bufs) {
        extra += ggml_backend_buffer_get_size(buf.get());
    }
    for (const auto & s : vsum) {
        extra += s.size()*sizeof(double);
    }
    for (const auto & f : in_sum) {
        extra += f.size();
    }
    return extra;
}
