// Helpers for kernel entry points called from Python. Tensors arrive as raw device addresses
// (tensor.data_ptr()) and the stream as torch's cuda_stream handle, both plain integers, so the
// extension never touches torch's C++ ABI. Invalid arguments throw std::invalid_argument, which
// pybind11 turns into a Python ValueError.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace dinotxt_fast {

template <typename... Parts>
[[noreturn]] void throw_invalid_argument(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw std::invalid_argument(message.str());
}

// require(cond, "q has ", n, " heads, expected ", h): throws ValueError with the joined message.
template <typename... Parts>
inline void require(bool condition, const Parts&... parts) {
  if (!condition) {
    throw_invalid_argument(parts...);
  }
}

inline void require_positive(std::int64_t value, const char* name) {
  require(value > 0, name, " must be positive, got ", value);
}

inline void require_multiple_of(std::int64_t value, std::int64_t divisor, const char* name) {
  require(divisor > 0 && value % divisor == 0, name, " must be a multiple of ", divisor, ", got ", value);
}

// 0 is the legacy default stream; any other value is a cudaStream_t handle.
inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Device address -> T*, checking it is non-null and aligned (vectorised loads need more than alignof(T)).
template <typename T>
T* as_ptr(std::uintptr_t address, const char* name, std::size_t alignment = alignof(T)) {
  require(address != 0, name, " is a null pointer");
  if (address % alignment != 0) {
    std::ostringstream hex;
    hex << std::hex << address;
    throw_invalid_argument(name, " (0x", hex.str(), ") is not aligned to ", alignment, " bytes");
  }
  return reinterpret_cast<T*>(address);
}

template <typename T>
constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

}  // namespace dinotxt_fast
