// sparq-cpp: how the settings of llama_sparq_set become a plan (llama-sparq-plan.cpp), for the C
// API (llama-sparq.cpp).
#pragma once

#include "llama-sparq.h"
#include "llama-sparq-kv.h"  // llama_sparq_bytes

#include "ggml-backend.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

class llama_kv_cache;
struct llama_context;

// the sequence length from which SparQ replaces dense attention
int32_t sparq_min_ctx(const llama_sparq_params & p);
// mean reallocation: as asked, else on for multi-head models and off for grouped-query ones
bool sparq_realloc(const llama_sparq_params & p, int64_t n_head, int64_t n_head_kv);
bool sparq_realloc(const llama_sparq_params & p, const llama_kv_cache & kv);
// a compression leaves room for rows after step 2's reads (always with a fixed k)
bool sparq_compression_fits(const llama_sparq_params & p, int64_t d, const llama_sparq_bytes * bytes);
// the K^T mirror's type for a layer whose cache holds type_k
ggml_type sparq_kt_type(const llama_sparq_params & p, ggml_type type_k, bool fused_takes_i8);
// the rules of the settings alone, and with a cache (kv may be null)
int32_t sparq_validate(const llama_sparq_params & p, const llama_kv_cache * kv);

// the cache of a context that can take SparQ (the full-attention one), and the layer count
llama_kv_cache * sparq_cache(const llama_context * ctx, int32_t * n_layers);
// why a context's memory cannot take SparQ (sparq_cache found no plain KV cache in it)
const char * sparq_memory_unsupported(const llama_context * ctx);
bool sparq_kv_type_ok(ggml_type t);
// why the op cannot take heads of this grouping and size, or nullptr
const char * sparq_heads_unsupported(int64_t n_head, int64_t n_head_kv, int64_t d, int64_t dv);
// the device that holds layer ikv's cache (host buffers: the CPU), or nullptr
ggml_backend_dev_t sparq_layer_device(const llama_kv_cache & kv, size_t ikv);
// the portable graph's flags for the backend of layer ikv (GGML_SPARQ_GATHER, GGML_SPARQ_MUL_MAT)
int32_t sparq_ops_flags(const llama_kv_cache & kv, size_t ikv);

// Which layers of a cache take SparQ with these settings, through which path, with which mirror,
// and whether a compression leaves room for rows after step 2 (llama_sparq_set, llama_sparq_plan)
struct sparq_layers {
    std::vector<bool> eligible, ops;
    std::vector<ggml_type> kt_types;  // GGML_TYPE_COUNT: the layer stays dense
    std::vector<std::pair<int32_t, const char *>> refused;  // (layer, why) of each refused layer
    bool compression_too_small = false;

    bool any_eligible() const { return std::find(eligible.begin(), eligible.end(), true) != eligible.end(); }

    // "layers 0-11, 14: why; layer 5: other why": the refused layers grouped by reason, runs of
    // three or more as ranges
    std::string describe_refused() const {
        std::vector<std::pair<const char *, std::vector<int32_t>>> groups;
        for (const auto & [il, why] : refused) {
            auto it = std::find_if(groups.begin(), groups.end(), [&](const auto & g) { return strcmp(g.first, why) == 0; });
            if (it == groups.end()) {
                groups.push_back({ why, { il } });
            } else {
                it->second.push_back(il);
            }
        }
        std::string out;
        for (const auto & [why, ils] : groups) {
            std::string list;
            for (size_t i = 0; i < ils.size();) {
                size_t j = i;
                while (j + 1 < ils.size() && ils[j + 1] == ils[j] + 1) {
                    ++j;
                }
                list += (list.empty() ? "" : ", ") + std::to_string(ils[i]);
                if (j - i >= 2) {
                    list += "-" + std::to_string(ils[j]);
                    i = j + 1;
                } else {
                    i = i + 1;
                }
            }
            out += (out.empty() ? "" : "; ") + std::string(ils.size() == 1 ? "layer " : "layers ") + list + ": " + why;
        }
        return out;
    }
};

sparq_layers sparq_plan_layers(const llama_kv_cache & kv, const llama_sparq_params & p);

// One layer that takes SparQ, for a sequence of n_pos positions (llama_sparq_plan, llama_sparq_plan_layer)
void sparq_plan_layer(const llama_sparq_params & p, int64_t d, int64_t dv, int64_t n_head_kv, ggml_type type_k,
                      ggml_type type_v, ggml_type type_kt, bool fused, bool realloc, int32_t n_pos,
                      llama_sparq_layer_plan & o);
