// sparq-cpp: SparQ attention in libllama (C API).
#include "llama-sparq.h"

#ifndef SPARQ_CPP_VERSION
#define SPARQ_CPP_VERSION "0.1.0"
#endif
#ifndef SPARQ_UPSTREAM_COMMIT
#define SPARQ_UPSTREAM_COMMIT "0c1e570"
#endif

const char * llama_sparq_version(void) {
    return "sparq-cpp " SPARQ_CPP_VERSION " (llama.cpp " SPARQ_UPSTREAM_COMMIT ")";
}
