// sparq-cpp: the --sparq-* flags of llama.cpp's common argument parser (native/patches/0008 calls
// common_sparq_add_args where common_params_parser_init adds its options). Values are checked
// here; the library checks the rest when common_init_from_params applies them (common-sparq.h).
#pragma once

#include "arg.h"
#include "common.h"

#include <stdexcept>
#include <string>

static inline float common_sparq_parse_fraction(const std::string & s) {
    size_t pos = 0;
    double v   = 0.0;
    try {
        const size_t slash = s.find('/');
        if (slash == std::string::npos) {
            v = std::stod(s, &pos);
        } else {
            size_t p2 = 0;
            const double num = std::stod(s.substr(0, slash), &pos);
            const double den = std::stod(s.substr(slash + 1), &p2);
            if (pos != slash || p2 != s.size() - slash - 1 || !(den > 0)) {
                pos = 0;
            } else {
                v   = num / den;
                pos = s.size();
            }
        }
    } catch (const std::exception &) {
        pos = 0;
    }
    if (pos != s.size() || !(v >= 0.0 && v <= 1.0)) {
        throw std::invalid_argument("--sparq-compression: '" + s + "' is not a fraction in [0, 1], such as 1/8 or 0.125 (0: off)");
    }
    return (float) v;
}

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
    add_opt(common_arg({ "--sparq-realloc" }, { "--no-sparq-realloc" },
        "SparQ: mean reallocation (mix in the mean of V; default: the model family's)",
        [](common_params & params, bool value) {
            params.sparq.mean_realloc = value ? 1 : 0;
            params.sparq.other_given = true;
        }).set_env("LLAMA_ARG_SPARQ_REALLOC"));
}
