// sparq-cpp: the --sparq-* flags of llama.cpp's common argument parser (native/patches/0007 calls
// common_sparq_add_args where common_params_parser_init adds its options). Values are checked
// here; the library checks the rest when common_init_from_params applies them (common-sparq.h).
#pragma once

#include "arg.h"
#include "common.h"

#include <stdexcept>
#include <string>

static inline void common_sparq_check_int(const char * flag, int v, int lo) {
    if (v < lo) {
        throw std::invalid_argument(std::string(flag) + " must be >= " + std::to_string(lo) + ", got " + std::to_string(v));
    }
}

template <typename AddOpt>
static void common_sparq_add_args(AddOpt && add_opt) {
    add_opt(common_arg({ "--sparq-compression" }, "F",
        "SparQ attention: read this fraction of dense attention's K/V bytes per generated token, "
        "such as 1/8 or 0.125 (default: 0, off: dense attention)",
        [](common_params & params, const std::string & value) {
            params.sparq.compression     = common_sparq_parse_fraction(value);
            params.sparq.compression_str = value;
        }).set_env("LLAMA_ARG_SPARQ_COMPRESSION"));
    add_opt(common_arg({ "--sparq-k" }, "N",
        "SparQ attention: positions read exactly per generated token, instead of a compression (default: 0, off)",
        [](common_params & params, int value) {
            common_sparq_check_int("--sparq-k", value, 0);
            params.sparq.k = value;
        }).set_env("LLAMA_ARG_SPARQ_K"));
    add_opt(common_arg({ "--sparq-r" }, "N",
        "SparQ: query components of the approximate scores (default: from the budget and head size)",
        [](common_params & params, int value) {
            common_sparq_check_int("--sparq-r", value, 1);
            params.sparq.r = value;
            params.sparq.other_given = true;
        }).set_env("LLAMA_ARG_SPARQ_R"));
    add_opt(common_arg({ "--sparq-l" }, "N",
        "SparQ: local window kept in every selection, 0..k (default: k/4)",
        [](common_params & params, int value) {
            common_sparq_check_int("--sparq-l", value, 0);
            params.sparq.l = value;
            params.sparq.other_given = true;
        }).set_env("LLAMA_ARG_SPARQ_L"));
    add_opt(common_arg({ "--sparq-min-ctx" }, "N",
        "SparQ: replaces dense attention from this cache length on (default: the library's)",
        [](common_params & params, int value) {
            common_sparq_check_int("--sparq-min-ctx", value, 0);
            params.sparq.min_ctx = value;
            params.sparq.other_given = true;
        }).set_env("LLAMA_ARG_SPARQ_MIN_CTX"));
    add_opt(common_arg({ "--sparq-mirror" }, "{auto,float}",
        "SparQ: the K^T copy the approximate scores read: auto (int8 where the CPU kernel runs on an f16 or q8_0 "
        "cache, half of f16's bytes, so a compression buys more rows) or float (f16; f32 for an f32 cache) (default: auto)",
        [](common_params & params, const std::string & value) {
            if (value != "auto" && value != "float") {
                throw std::invalid_argument("--sparq-mirror: '" + value + "' is not auto or float");
            }
            params.sparq.mirror = value == "auto" ? LLAMA_SPARQ_MIRROR_AUTO : LLAMA_SPARQ_MIRROR_FLOAT;
            params.sparq.other_given = true;
        }).set_env("LLAMA_ARG_SPARQ_MIRROR"));
    add_opt(common_arg({ "--sparq-realloc" }, { "--no-sparq-realloc" },
        "SparQ: mean reallocation (mix in the mean of V; default: the model family's)",
        [](common_params & params, bool value) {
            params.sparq.mean_realloc = value ? 1 : 0;
            params.sparq.other_given = true;
        }).set_env("LLAMA_ARG_SPARQ_REALLOC"));
}
