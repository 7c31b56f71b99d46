#pragma once
// Fault injection for the integration tests: in builds with MAILFLOW_FAILPOINTS (Debug: the dev and asan
// presets, which the tests use), the environment variable MAILFLOWD_FAILPOINTS="name=N[,name=N...]" makes the
// N-th call of failpoint(name) in the process throw std::runtime_error, once; "name=Nms" makes
// failpoint_delay(name) give N milliseconds (a slow disk to sleep for, or a shorter period). Elsewhere (the
// optimized build that users run) they compile to nothing.
#include <chrono>
#include <string_view>

namespace mailflow {

#ifdef MAILFLOW_FAILPOINTS
void failpoint(std::string_view name);
std::chrono::milliseconds failpoint_delay(std::string_view name);  // zero when not set
#else
inline void failpoint(std::string_view) {}
inline std::chrono::milliseconds failpoint_delay(std::string_view) { return {}; }
#endif

}  // namespace mailflow
