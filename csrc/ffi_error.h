// Errors across the C ABI of csrc/: every exported function catches C++ exceptions (which must not
// cross into Rust) and returns them as a malloc'ed message, NULL on success; Rust reads and frees
// it with ffi::take_error (tricks_dist_free_error).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace tricks {

inline char* error_copy(const std::string& msg) {
  char* out = static_cast<char*>(std::malloc(msg.size() + 1));
  if (out != nullptr) std::memcpy(out, msg.c_str(), msg.size() + 1);
  return out;
}

// Runs f(); NULL when it returns, the exception's message when it throws.
template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return error_copy(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return error_copy(e.what());
  } catch (...) {
    return error_copy("unknown C++ exception");
  }
}

}  // namespace tricks
