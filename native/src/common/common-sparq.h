// sparq-cpp: SparQ settings of llama.cpp's common tools (llama-cli, llama-server, ...): the
// --sparq-* flags and LLAMA_ARG_SPARQ_* variables (arg-sparq.h) fill common_params::sparq, and
// common_init_from_params turns SparQ on with them right after it makes the context
// (native/patches/0007 hooks both in).
#pragma once

#include "llama.h"
#include "llama-sparq.h"

#include <cstdio>
#include <stdexcept>
#include <string>

struct common_sparq_params {
    int         k            = 0;     // positions read exactly per token; 0: not given
    float       compression  = 0.0f;  // fraction of dense attention's reads; 0: not given
    std::string compression_str;      // as given ("1/8"), for messages
    int         r            = 0;     // 0: default
    int         l            = -1;    // -1: default
    int         min_ctx      = -1;    // -1: default
    int         mean_realloc = -1;    // -1: the model's default, 0 off, 1 on
    int         mirror       = LLAMA_SPARQ_MIRROR_AUTO; // enum llama_sparq_mirror
    bool        other_given  = false; // r, l, min-ctx, realloc or mirror given

    bool enabled() const { return k > 0 || compression > 0.0f; }
};

// "1/8", "0.125", "0" -> the fraction (0: off); std::invalid_argument outside [0, 1]
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

static inline llama_sparq_params common_sparq_llama_params(const common_sparq_params & sp) {
    llama_sparq_params p = llama_sparq_default_params();
    p.k            = sp.k;
    p.compression  = sp.compression;
    p.r            = sp.r;
    p.l            = sp.l;
    p.min_ctx      = sp.min_ctx;
    p.mean_realloc = sp.mean_realloc;
    p.mirror       = sp.mirror;
    return p;
}

// After the context is made. SparQ off (no budget given): nothing to do. False, with the reason
// printed, when the settings are refused: the caller fails as for a context it could not make.
// announce: say on stderr that SparQ is on (llama-cli, llama-server; llama-bench has its columns).
static inline bool common_sparq_apply(llama_context * ctx, const common_sparq_params & sp, bool announce = true) {
    if (!sp.enabled()) {
        if (sp.other_given) {
            fprintf(stderr, "error: --sparq-r/-l/-min-ctx/-realloc/-mirror need a budget: --sparq-compression or --sparq-k\n");
            return false;
        }
        return true;
    }
    const llama_sparq_params p = common_sparq_llama_params(sp);
    const int32_t st = llama_sparq_set(ctx, &p);  // the library's rules (llama_sparq_params_check), then the model's
    if (st < 0) {
        fprintf(stderr, "error: SparQ settings refused: %s%s\n", llama_sparq_strerror(st),
                st == LLAMA_SPARQ_ERR_V_TRANS ? " (SparQ needs flash attention: -fa on or auto)" : "");
        return false;
    }
    if (st == LLAMA_SPARQ_DENSE) {
        fprintf(stderr, "warning: SparQ is not used: %s; decoding stays dense\n", llama_sparq_dense_reason());
        return true;
    }
    if (*llama_sparq_dense_reason() != '\0') {  // some layers stay dense: which, and why
        fprintf(stderr, "warning: %s\n", llama_sparq_dense_reason());
    }
    if (announce) {
        std::string given = sp.k > 0 ? "--sparq-k " + std::to_string(sp.k) : "--sparq-compression " + sp.compression_str;
        given += sp.r > 0 ? " --sparq-r " + std::to_string(sp.r) : "";
        given += sp.l >= 0 ? " --sparq-l " + std::to_string(sp.l) : "";
        given += sp.min_ctx >= 0 ? " --sparq-min-ctx " + std::to_string(sp.min_ctx) : "";
        given += sp.mean_realloc >= 0 ? (sp.mean_realloc ? " --sparq-realloc" : " --no-sparq-realloc") : "";
        given += sp.mirror == LLAMA_SPARQ_MIRROR_FLOAT ? " --sparq-mirror float" : "";
        fprintf(stderr, "sparq-cpp: SparQ attention on (%s)\n", given.c_str());
    }
    return true;
}
