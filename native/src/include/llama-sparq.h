// sparq-cpp: the C API of SparQ attention in our libllama fork.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

// Version of sparq-cpp's fork, e.g. "sparq-cpp 0.1.0 (llama.cpp 0c1e570)".
// Answers only from our library: it is how tests prove the fork is the one loaded.
LLAMA_API const char * llama_sparq_version(void);

#ifdef __cplusplus
}
#endif
