// sparq-cpp: the C API of SparQ attention in our libllama fork.
//
// SparQ is set on a live context (llama_context_params is passed by value from Python and keeps
// upstream's layout). It needs V stored row-major: create the context with flash attention
// enabled (flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED or AUTO), otherwise llama_sparq_set
// returns LLAMA_SPARQ_ERR_V_TRANS.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

// Version of sparq-cpp's fork, e.g. "sparq-cpp 0.1.0 (llama.cpp 0c1e570)".
// Answers only from our library: it is how tests prove the fork is the one loaded.
LLAMA_API const char * llama_sparq_version(void);

// The sequence length from which SparQ replaces dense attention when min_ctx is -1 (below it the
// reads SparQ saves do not pay for its selection).
#define LLAMA_SPARQ_DEFAULT_MIN_CTX 512

struct llama_sparq_params {
    int32_t k;           // positions read exactly per query (top-k), >= 1; 0: chosen by compression
    float   compression; // target fraction of dense attention's K/V reads, in (0, 1]; 0: fixed k
    int32_t r;           // query components for the approximate scores, 1..head size; 0: default
    int32_t l;           // local window kept in every selection, 0..k; -1: default (k/4)
    int32_t mean_realloc; // mean reallocation (alpha mix with the mean of V): -1 model default, 0 off, 1 on
    int32_t min_ctx;     // SparQ replaces dense attention once a sequence holds this many positions; -1: default
    int32_t layer_start; // first layer that may use SparQ
    int32_t layer_end;   // one past the last layer that may use SparQ; -1: up to the last layer
    bool    no_tau;      // ablation: scale the approximate scores by the dense scale instead of tau
    int32_t path;        // enum llama_sparq_path: how SparQ is computed
    int32_t mirror;      // enum llama_sparq_mirror: the K^T mirror's element type
};

// The K^T mirror that step 2 reads. INT8: a position's components share a power-of-two scale
// (one byte per component, one per position for the exponent), half of F16's bytes, so that at
// a given compression the budget buys more rows k; the fused op reads it, the portable graph does not.
enum llama_sparq_mirror {
    LLAMA_SPARQ_MIRROR_AUTO  = 0, // INT8 where the fused op runs on an F16 or Q8_0 cache, else FLOAT
    LLAMA_SPARQ_MIRROR_FLOAT = 1, // F16 (F32 for an F32 cache) everywhere
};

// How a layer computes SparQ. The fused op (GGML_OP_SPARQ_ATTN) needs a kernel in the layer's
// backend (the CPU has one); the portable graph is built from standard ggml ops (top_k,
// get_rows, mul_mat, soft_max, ...) that every backend has (Vulkan, CUDA, Metal, ...), with the
// same result up to rounding and ties (docs/sparq.md).
enum llama_sparq_path {
    LLAMA_SPARQ_PATH_AUTO  = 0, // the fused op where the layer's backend has it, else the portable graph
    LLAMA_SPARQ_PATH_FUSED = 1, // the fused op only; layers whose backend lacks it stay dense
    LLAMA_SPARQ_PATH_OPS   = 2, // the portable graph on every backend, the CPU included
};

enum llama_sparq_status {
    LLAMA_SPARQ_OK              =   0,
    LLAMA_SPARQ_DENSE           =   1, // accepted, but SparQ cannot run here (llama_sparq_dense_reason): decoding stays dense
    LLAMA_SPARQ_ROTATED         =   2, // llama_sparq_prepare_cache: the cache already holds Hadamard-rotated keys
    LLAMA_SPARQ_ERR_NULL        =  -1, // ctx is NULL
    LLAMA_SPARQ_ERR_K           =  -2, // k < 0, or neither k nor compression given
    LLAMA_SPARQ_ERR_COMPRESSION =  -3, // compression not in (0, 1], or too small for r
    LLAMA_SPARQ_ERR_BOTH        =  -4, // both k and compression given
    LLAMA_SPARQ_ERR_R           =  -5, // r < 0 or larger than the head size
    LLAMA_SPARQ_ERR_L           =  -6, // l < -1, or l > k
    LLAMA_SPARQ_ERR_REALLOC     =  -7, // mean_realloc not in {-1, 0, 1}
    LLAMA_SPARQ_ERR_MIN_CTX     =  -8, // min_ctx < -1
    LLAMA_SPARQ_ERR_LAYERS      =  -9, // layer range empty or outside the model
    LLAMA_SPARQ_ERR_V_TRANS     = -10, // the context stores V transposed (flash attention disabled)
    LLAMA_SPARQ_ERR_ALLOC       = -11, // the K^T mirror could not be allocated
    LLAMA_SPARQ_ERR_PATH        = -12, // path is not a llama_sparq_path value
    LLAMA_SPARQ_ERR_MIRROR      = -13, // mirror is not a llama_sparq_mirror value
    LLAMA_SPARQ_ERR_SHAPE       = -14, // llama_sparq_plan_layer: a head count, head size, cache type or n_pos out of range
};

struct llama_sparq_stats {
    int64_t n_tokens_sparq;   // tokens whose attention went through SparQ
    int64_t n_tokens_dense;   // tokens decoded densely while SparQ was set (prefill, short context)
    int32_t n_layers_sparq;   // attention layers that take SparQ
    int32_t n_layers;         // attention layers of the model
    double  bytes_attn_sparq; // estimated K/V bytes read by those layers' attention for the SparQ tokens
    double  bytes_attn_dense; // what dense attention would have read for the same tokens and layers
    int64_t extra_bytes;      // memory SparQ adds: the K^T mirror plus the running V sums
    int32_t n_layers_ops;     // of n_layers_sparq, layers that run the portable graph (the others: the fused op)
};

// One attention layer's SparQ plan for a sequence of n_pos positions (llama_sparq_plan)
struct llama_sparq_layer_plan {
    int32_t il;           // the model's layer
    int32_t path;         // 0: dense (the layer cannot take SparQ, or the sequence is shorter than
                          // what SparQ replaces dense attention from), 1: the fused op, 2: the portable graph
    int32_t r;            // query components of the approximate scores (step 1)
    int32_t k;            // positions whose K and V rows are read (the window included); n_pos when dense
    int32_t l;            // the local window, the last l positions, always among the k
    int32_t type_kt;      // ggml_type of the K^T mirror step 2 reads (GGML_TYPE_I8, F16 or F32); -1 when dense
    double  bytes;        // estimated K/V bytes a token reads in this layer (mirror included)
    double  bytes_dense;  // what dense attention reads there
};

// What llama_sparq_set(ctx, params) would do for a sequence of n_pos positions, without doing it
// or decoding anything: for each attention layer of the cache SparQ serves (up to n_max, in cache
// order), which path, r, k, l and mirror. The one budget plan: the decode runs exactly it.
// Returns the number of layers (those past n_max are not written), or the negative status
// llama_sparq_set would return for these settings (LLAMA_SPARQ_ERR_NULL for a NULL ctx or params,
// LLAMA_SPARQ_ERR_V_TRANS where V is stored transposed, ...); 0 where no cache can take SparQ.
LLAMA_API int32_t llama_sparq_plan(const struct llama_context * ctx, const struct llama_sparq_params * params,
                                   int32_t n_pos, struct llama_sparq_layer_plan * out, int32_t n_max);

// The plan of one attention layer from its shape alone, without a model or context (benchmarks,
// sizing a machine): n_head query and n_head_kv KV heads of sizes d (K) and dv (V), a cache of
// type_k/type_v, the fused op on the CPU (fused) or the portable graph, n_pos positions. The same
// rules as llama_sparq_plan for a layer that takes SparQ; out->il is 0. Returns LLAMA_SPARQ_OK,
// LLAMA_SPARQ_ERR_SHAPE for a shape SparQ does not take, or the status llama_sparq_set would give.
LLAMA_API int32_t llama_sparq_plan_layer(const struct llama_sparq_params * params, int32_t n_head, int32_t n_head_kv,
                                         int32_t d, int32_t dv, enum ggml_type type_k, enum ggml_type type_v,
                                         bool fused, int32_t n_pos, struct llama_sparq_layer_plan * out);

// The rules of the settings alone (no model needed): LLAMA_SPARQ_OK or the negative status
// llama_sparq_set would return for them on any model (NULL: LLAMA_SPARQ_ERR_NULL). The one check
// behind Python's SparqParams, llama.cpp's --sparq-* flags and llama-bench's grid; llama_sparq_set
// adds the model's (layer range, r against the head size, room for rows after step 2).
LLAMA_API int32_t llama_sparq_params_check(const struct llama_sparq_params * params);

LLAMA_API struct llama_sparq_params llama_sparq_default_params(void);

// Turn SparQ on (or change its settings) for decoding with ctx; params == NULL turns it off and
// frees what it allocated. Returns LLAMA_SPARQ_OK, LLAMA_SPARQ_DENSE, or a negative error code
// (nothing changed). Never aborts. Tokens already in the cache are taken into account.
LLAMA_API int32_t llama_sparq_set(struct llama_context * ctx, const struct llama_sparq_params * params);

// Gets the context's cache ready for SparQ without turning SparQ on (llama_sparq_set does the
// same). With a quantized cache llama.cpp rotates Q and K by a Hadamard matrix, which spreads q
// over all components, against SparQ's choice of the r largest; K is stored rotated, so the
// rotation can only be dropped while the cache is empty. For a fresh context whose dense and
// SparQ decodes should share one cache (benchmarks, evaluations). Returns LLAMA_SPARQ_OK
// (ready), LLAMA_SPARQ_ROTATED (rotated keys already cached; SparQ would work in that basis,
// a warning is logged), LLAMA_SPARQ_DENSE (no cache SparQ can use) or LLAMA_SPARQ_ERR_NULL.
LLAMA_API int32_t llama_sparq_prepare_cache(struct llama_context * ctx);

// 1 and *params filled when SparQ is set, 0 when it is off, LLAMA_SPARQ_ERR_NULL for NULL ctx.
LLAMA_API int32_t llama_sparq_get(const struct llama_context * ctx, struct llama_sparq_params * params);

LLAMA_API int32_t llama_sparq_stats_get(const struct llama_context * ctx, struct llama_sparq_stats * stats);
LLAMA_API void    llama_sparq_stats_reset(struct llama_context * ctx);

// Consistency check (tests): compares the K^T mirror with K over the used cells, and each
// running V sum (kept in fp64, given to the op in fp32) with a fresh fp64 sum over its cells.
// Returns the number of mirror elements that differ (0 when consistent; the mirror is compared as
// it stands, so call it after a decode), and sets *max_rel_err_v to the largest
// |fp32 sum - fresh| / (1 + |fresh|), at most 2^-24 when consistent. -1 for a NULL ctx.
LLAMA_API int64_t llama_sparq_check(const struct llama_context * ctx, float * max_rel_err_v);

// The name of the device that holds layer il's KV cache (and so runs its SparQ attention, fused
// op or portable graph), e.g. "CPU" or "Vulkan0"; NULL when SparQ is off or layer il does not
// take it.
LLAMA_API const char * llama_sparq_layer_device(const struct llama_context * ctx, int32_t il);

// The graph of the last ubatch the context decoded, SparQ or dense: its node count, and in
// n_compute (if not NULL) the nodes that compute, views, reshapes and permutes left out (on a GPU
// each is a kernel launch unless the backend fuses it with its neighbours); -1 for a NULL context.
LLAMA_API int32_t llama_sparq_graph_size(const struct llama_context * ctx, int32_t * n_compute);

// A short description of a llama_sparq_status value.
LLAMA_API const char * llama_sparq_strerror(int32_t status);

// Why the last llama_sparq_set of this thread returned LLAMA_SPARQ_DENSE: no layer of the model
// or cache can take SparQ (and which reason), or the context holds fewer positions per sequence
// than min_ctx, so that SparQ would never run (nothing is allocated then). After LLAMA_SPARQ_OK:
// the layers of the cache that stay dense and why ("SparQ on 20 of 24 attention layers; dense:
// layers 3, 7: ..."), "" when SparQ takes them all. "" after any other result.
LLAMA_API const char * llama_sparq_dense_reason(void);

#ifdef __cplusplus
}
#endif
