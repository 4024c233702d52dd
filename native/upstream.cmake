# Where the pinned llama.cpp source comes from.
#
# llama.cpp is taken from the source distribution of llama-cpp-python on PyPI, which vendors
# it (llama.cpp 0c1e570, SPARQ_UPSTREAM_COMMIT below). It is fetched by package name at build
# time, checked against the sha256 below, extracted (only what the build needs), patched and
# overlaid with our files by native/prepare_upstream.py. No upstream source is committed to this repository.
set(SPARQ_UPSTREAM_PACKAGE  "llama-cpp-python")
set(SPARQ_UPSTREAM_VERSION  "0.3.36")
set(SPARQ_UPSTREAM_SHA256   "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
set(SPARQ_UPSTREAM_COMMIT   "0c1e570")
