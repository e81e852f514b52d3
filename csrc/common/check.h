// CUDA error checking. A failed call throws dinotxt_fast::CudaError (a std::runtime_error), which
// pybind11 turns into a Python RuntimeError carrying file:line, the failed expression and CUDA's
// error name and description.
#pragma once

#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>
#include <string>

namespace dinotxt_fast {

class CudaError : public std::runtime_error {
 public:
  CudaError(cudaError_t code, const std::string& message) : std::runtime_error(message), code_(code) {}
  cudaError_t code() const noexcept { return code_; }

 private:
  cudaError_t code_;
};

// Path from "csrc/" on, so messages do not carry the build machine's directories.
inline const char* short_source_path(const char* file) {
  const char* csrc = std::strstr(file, "csrc/");
  return csrc != nullptr ? csrc : file;
}

[[noreturn]] inline void throw_cuda_error(cudaError_t code, const char* expr, const char* file, int line) {
  throw CudaError(code, std::string(short_source_path(file)) + ":" + std::to_string(line) + ": " + expr +
                            " failed: " + cudaGetErrorName(code) + " (" + cudaGetErrorString(code) + ")");
}

}  // namespace dinotxt_fast

#define DTF_CUDA_CHECK(expr)                                                      \
  do {                                                                            \
    const cudaError_t dtf_err_ = (expr);                                          \
    if (dtf_err_ != cudaSuccess) {                                                \
      ::dinotxt_fast::throw_cuda_error(dtf_err_, #expr, __FILE__, __LINE__);      \
    }                                                                             \
  } while (0)

// After a kernel launch: reports launch-configuration errors (bad grid, too much shared memory).
#define DTF_CHECK_LAUNCH() DTF_CUDA_CHECK(cudaGetLastError())
