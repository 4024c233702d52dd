// sparq-cpp: SparQ settings in llama-bench (hooked in by native/patches/0006).
//
//   --sparq-compression 0,1/8,1/16   target fraction of dense attention's reads (0: dense)
//   --sparq-k 0,64                   positions read exactly per token, instead (0: dense)
//   --sparq-r, --sparq-l, --sparq-min-ctx, --sparq-realloc, --sparq-mirror   the other parameters of SparQ
//
// Like llama-bench's own parameters each takes comma-separated values. The budgets (the
// compression values, then the k values) form one dimension of the test grid, innermost, so that
// dense and SparQ rows of one depth come together; r, l, min-ctx and realloc multiply the SparQ
// rows only (a dense row has none of them). SparQ is set with llama_sparq_set right after the
// context is made (it needs flash attention: auto or on). They are columns in every output:
// markdown shows those given on the command line, CSV/JSON/SQL all of them, and `sparq_tokens`
// counts the tokens of the timed runs that took SparQ.
#pragma once

#include "common-sparq.h"
#include "llama.h"
#include "llama-sparq.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

struct sparq_bench_setting {
    common_sparq_params p;                  // k == 0 and compression == 0: dense
    std::string         compression = "0";  // the column: as given ("1/8", "0.125"); "-" for a k row
    int64_t             n_tokens_sparq = 0; // measured: tokens of the timed runs that went through SparQ

    bool dense() const { return !p.enabled(); }
};

struct sparq_bench_lists {
    std::vector<std::string> compression;
    std::vector<int>         k, r, l, min_ctx, realloc, mirror;  // mirror: enum llama_sparq_mirror
};

static int sparq_bench_parse_int(const std::string & flag, const std::string & s, int lo, int hi) {
    size_t pos = 0;
    const long v = std::stol(s, &pos);
    if (pos != s.size() || v < lo || v > hi) {
        throw std::invalid_argument(flag + ": '" + s + "' is not an integer in [" + std::to_string(lo) + ", " +
                                    std::to_string(hi) + "]");
    }
    return (int) v;
}

static std::vector<std::string> sparq_bench_split(const std::string & s) {
    std::vector<std::string> out;
    size_t start = 0;
    while (true) {
        const size_t comma = s.find(',', start);
        out.push_back(s.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
        if (comma == std::string::npos) {
            return out;
        }
        start = comma + 1;
    }
}

static void sparq_bench_print_usage() {
    printf("\n");
    printf("SparQ attention (sparq-cpp; each takes comma-separated values, 0 = dense):\n");
    printf("  --sparq-compression <f>                   (default: 0) fraction of dense attention's reads, 1/8 or 0.125\n");
    printf("  --sparq-k <n>                             (default: 0) positions read exactly per token, instead\n");
    printf("  --sparq-r <n>                             (default: 0 = from the budget) query components\n");
    printf("  --sparq-l <n>                             (default: -1 = k/4) local window\n");
    printf("  --sparq-min-ctx <n>                       (default: -1 = 512) SparQ once a sequence holds this many tokens\n");
    printf("  --sparq-realloc <0|1>                     (default: -1 = the model's) mean reallocation\n");
    printf("  --sparq-mirror <auto|float>               (default: auto) the K^T copy the approximate scores read\n");
}

// One llama-bench argument: true when it is a SparQ flag (its value consumed); a bad value prints
// an error and sets invalid (llama-bench then prints its usage and exits with 1).
static bool sparq_bench_parse_arg(const std::string & arg, int & i, int argc, char ** argv,
                                  sparq_bench_lists & lists, bool & invalid) {
    static const char * flags[] = { "--sparq-compression", "--sparq-k", "--sparq-r", "--sparq-l",
                                    "--sparq-min-ctx", "--sparq-realloc", "--sparq-mirror" };
    bool known = false;
    for (const char * f : flags) {
        known = known || arg == f;
    }
    if (!known) {
        return false;
    }
    if (++i >= argc) {
        fprintf(stderr, "error: %s needs a value\n", arg.c_str());
        invalid = true;
        return true;
    }
    try {
        for (const auto & v : sparq_bench_split(argv[i])) {
            if (arg == "--sparq-compression") {
                common_sparq_parse_fraction(v);
                lists.compression.push_back(v);
            } else if (arg == "--sparq-k") {
                lists.k.push_back(sparq_bench_parse_int(arg, v, 0, 1 << 30));
            } else if (arg == "--sparq-r") {
                lists.r.push_back(sparq_bench_parse_int(arg, v, 0, 1 << 16));
            } else if (arg == "--sparq-l") {
                lists.l.push_back(sparq_bench_parse_int(arg, v, -1, 1 << 30));
            } else if (arg == "--sparq-min-ctx") {
                lists.min_ctx.push_back(sparq_bench_parse_int(arg, v, -1, 1 << 30));
            } else if (arg == "--sparq-mirror") {
                if (v != "auto" && v != "float") {
                    throw std::invalid_argument("--sparq-mirror: '" + v + "' is not auto or float");
                }
                lists.mirror.push_back(v == "auto" ? LLAMA_SPARQ_MIRROR_AUTO : LLAMA_SPARQ_MIRROR_FLOAT);
            } else {
                lists.realloc.push_back(sparq_bench_parse_int(arg, v, 0, 1));
            }
        }
    } catch (const std::exception & e) {
        // std::stoi and friends say only "stoi": name the flag and the value
        const std::string what = e.what();
        if (what.rfind("--sparq", 0) == 0) {
            fprintf(stderr, "error: %s\n", what.c_str());
        } else {
            fprintf(stderr, "error: %s: '%s' is not a number\n", arg.c_str(), argv[i]);
        }
        invalid = true;
    }
    return true;
}

// The SparQ settings of the grid: dense and each budget, times the other parameters' values.
static std::vector<sparq_bench_setting> sparq_bench_settings(const sparq_bench_lists & lists) {
    auto or_default = [](const std::vector<int> & v, int d) { return v.empty() ? std::vector<int>{ d } : v; };
    std::vector<sparq_bench_setting> budgets;
    for (const auto & c : lists.compression) {
        sparq_bench_setting s;
        s.compression       = c;
        s.p.compression     = common_sparq_parse_fraction(c);
        s.p.compression_str = c;
        budgets.push_back(s);
    }
    for (int k : lists.k) {
        sparq_bench_setting s;
        s.p.k         = k;
        s.compression = k > 0 ? "-" : "0"; // a k row has no compression
        budgets.push_back(s);
    }
    if (budgets.empty()) {
        budgets.emplace_back(); // no budget given: dense only, llama-bench as upstream
    }
    std::vector<sparq_bench_setting> out;
    for (const auto & b : budgets) {
        if (b.dense()) {
            out.push_back(b);
            continue;
        }
        for (int r : or_default(lists.r, 0))
        for (int l : or_default(lists.l, -1))
        for (int m : or_default(lists.min_ctx, -1))
        for (int a : or_default(lists.realloc, -1))
        for (int mi : or_default(lists.mirror, LLAMA_SPARQ_MIRROR_AUTO)) {
            sparq_bench_setting s = b;
            s.p.r = r; s.p.l = l; s.p.min_ctx = m; s.p.mean_realloc = a; s.p.mirror = mi;
            // the library's rules of the settings, before any model loads (llama-bench exits with 1
            // on a bad parameter, as for its own)
            const llama_sparq_params lp = common_sparq_llama_params(s.p);
            const int32_t st = llama_sparq_params_check(&lp);
            if (st < 0) {
                fprintf(stderr, "error: SparQ setting (%s%s, r %d, l %d) refused: %s\n", s.p.k > 0 ? "k " : "compression ",
                        s.p.k > 0 ? std::to_string(s.p.k).c_str() : s.compression.c_str(), r, l, llama_sparq_strerror(st));
                exit(1);
            }
            out.push_back(s);
        }
    }
    return out;
}

// Each test instance once per SparQ setting (the setting varies fastest). SparQ needs flash
// attention (V stored row-major): with -fa 0 only the dense row is run, and that is said once.
template <typename Instance>
static std::vector<Instance> sparq_bench_expand(const std::vector<Instance> & instances, const sparq_bench_lists & lists) {
    const auto settings = sparq_bench_settings(lists);
    std::vector<Instance> out;
    bool skipped = false;
    for (const auto & inst : instances) {
        for (const auto & s : settings) {
            if (!s.dense() && inst.flash_attn == LLAMA_FLASH_ATTN_TYPE_DISABLED) {
                skipped = true;
                continue;
            }
            out.push_back(inst);
            out.back().sparq = s;
        }
    }
    if (skipped) {
        fprintf(stderr, "warning: SparQ needs flash attention: with -fa 0 only the dense rows run\n");
    }
    // SparQ replaces dense attention in generation once a sequence holds min_ctx positions: say
    // once which rows stay below it (and so decode densely) and why
    std::vector<std::string> short_rows;
    int min_ctx_short = 0;
    for (const auto & inst : out) {
        if (inst.sparq.dense() || inst.n_gen <= 0) {
            continue;
        }
        const int min_ctx = inst.sparq.p.min_ctx >= 0 ? inst.sparq.p.min_ctx : LLAMA_SPARQ_DEFAULT_MIN_CTX;
        const int longest = inst.n_depth + inst.n_prompt + inst.n_gen;
        const std::string row = "tg" + std::to_string(inst.n_gen) + " @ d" + std::to_string(inst.n_depth);
        if (longest < min_ctx && std::find(short_rows.begin(), short_rows.end(), row) == short_rows.end()) {
            short_rows.push_back(row);
            min_ctx_short = min_ctx;
        }
    }
    if (!short_rows.empty()) {
        std::string rows;
        for (const auto & r : short_rows) {
            rows += (rows.empty() ? "" : ", ") + r;
        }
        fprintf(stderr, "warning: SparQ rows of %s decode densely: their sequences stay below SparQ's min_ctx (%d), "
                "the length from which it replaces dense attention (use -d, or --sparq-min-ctx)\n", rows.c_str(), min_ctx_short);
    }
    return out;
}

// After the context is made: turns SparQ on for a SparQ setting. False, with the reason printed,
// when the library refuses the setting (llama-bench then exits with 1).
static bool sparq_bench_apply(llama_context * ctx, const sparq_bench_setting & s) {
    return common_sparq_apply(ctx, s.p, /*announce =*/ false);
}

// Before a timed run, after the depth is in the cache: resets SparQ's counters. A depth restored from llama-bench's state
// cache leaves SparQ's K^T mirror and V sums to be rebuilt at the next decode, which would fall
// inside the timing: one untimed token at the end of the depth rebuilds them, and is removed.
static void sparq_bench_before_timing(llama_context * ctx, const sparq_bench_setting & s, int n_depth) {
    if (s.dense()) {
        return;
    }
    if (n_depth <= 0) {
        llama_sparq_stats_reset(ctx);
        return;
    }
    llama_token tok = llama_vocab_bos(llama_model_get_vocab(llama_get_model(ctx)));
    if (tok == LLAMA_TOKEN_NULL) {
        tok = 0;
    }
    if (llama_decode(ctx, llama_batch_get_one(&tok, 1)) == 0) {
        llama_synchronize(ctx);
    }
    llama_memory_seq_rm(llama_get_memory(ctx), 0, n_depth, -1);
    llama_sparq_stats_reset(ctx);
}

static void sparq_bench_after_run(const llama_context * ctx, sparq_bench_setting & s) {
    llama_sparq_stats st;
    if (!s.dense() && llama_sparq_stats_get(ctx, &st) == 0) {
        s.n_tokens_sparq += st.n_tokens_sparq;
    }
}

static std::vector<std::string> sparq_bench_add_fields(std::vector<std::string> fields) {
    for (const char * f : { "sparq_compression", "sparq_k", "sparq_r", "sparq_l", "sparq_min_ctx", "sparq_realloc",
                            "sparq_mirror", "sparq_tokens" }) {
        fields.emplace_back(f);
    }
    return fields;
}

static bool sparq_bench_is_int_field(const std::string & f) {
    return f == "sparq_k" || f == "sparq_r" || f == "sparq_l" || f == "sparq_min_ctx" || f == "sparq_realloc" ||
           f == "sparq_tokens";
}

static void sparq_bench_add_values(std::vector<std::string> & values, const sparq_bench_setting & s) {
    values.push_back(s.compression);
    values.push_back(std::to_string(s.p.k));
    values.push_back(std::to_string(s.p.r));
    values.push_back(std::to_string(s.p.l));
    values.push_back(std::to_string(s.p.min_ctx));
    values.push_back(std::to_string(s.p.mean_realloc));
    values.push_back(s.p.mirror == LLAMA_SPARQ_MIRROR_FLOAT ? "float" : "auto");
    values.push_back(std::to_string(s.n_tokens_sparq));
}

// The markdown table's SparQ columns: those given on the command line.
static void sparq_bench_markdown_fields(const sparq_bench_lists & lists, std::vector<std::string> & fields) {
    if (!lists.compression.empty()) fields.emplace_back("sparq_compression");
    if (!lists.k.empty())           fields.emplace_back("sparq_k");
    if (!lists.r.empty())           fields.emplace_back("sparq_r");
    if (!lists.l.empty())           fields.emplace_back("sparq_l");
    if (!lists.min_ctx.empty())     fields.emplace_back("sparq_min_ctx");
    if (!lists.realloc.empty())     fields.emplace_back("sparq_realloc");
    if (!lists.mirror.empty())      fields.emplace_back("sparq_mirror");
}
