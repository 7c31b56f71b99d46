#pragma once
// Fault injection for the integration tests: in builds with MAILFLOW_FAILPOINTS (Debug: the dev and asan
// presets, which the tests use), the environment variable MAILFLOWD_FAILPOINTS="name=N[,name=N...]" makes the
// N-th call of failpoint(name) in the process throw std::runtime_error, once. Elsewhere (the optimized build
// that users run) it compiles to nothing.
#include <string_view>

namespace mailflow {

#ifdef MAILFLOW_FAILPOINTS
void failpoint(std::string_view name);
#else
inline void failpoint(std::string_view) {}
#endif

}  // namespace mailflow
