// Python module dinotxt_fast._C. Kernel families (csrc/<family>/) expose plain C++ launchers that take
// device addresses and a stream as integers; they are bound here, so no .cu file includes pybind11.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

// CUDA encodes versions as 1000 * major + 10 * minor (13000 -> "13.0").
std::string cuda_version_string(int version) {
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

std::vector<std::string> compiled_archs() {
  std::vector<std::string> archs;
  std::stringstream csv(DINOTXT_FAST_CUDA_ARCHS);
  for (std::string arch; std::getline(csv, arch, ',');) {
    archs.push_back(arch);
  }
  return archs;
}

struct DeviceInfo {
  int index;
  std::string name;
  std::tuple<int, int> capability;
  int sm_count;
  size_t total_memory;
  int l2_cache_size;
  size_t max_shared_memory_per_block_optin;
};

struct CudaInfo {
  int runtime_version = 0;
  int driver_version = 0;
  int device_count = 0;
  std::vector<DeviceInfo> devices;
  std::string error;
};

std::string describe_error(cudaError_t err, const char* call, const CudaInfo& info) {
  std::string message = std::string(call) + " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  if (err == cudaErrorInsufficientDriver) {
    message += info.driver_version > 0
                   ? "; the driver supports CUDA " + cuda_version_string(info.driver_version) +
                         ", this extension was built with CUDA " + cuda_version_string(info.runtime_version)
                   : "; no CUDA driver found (libcuda.so.1 cannot be loaded)";
  }
  return message;
}

// Plain runtime queries only: no context is created, so this is cheap and safe in every process.
CudaInfo query_cuda() {
  CudaInfo info;
  cudaRuntimeGetVersion(&info.runtime_version);
  if (cudaDriverGetVersion(&info.driver_version) != cudaSuccess) {
    info.driver_version = 0;
  }
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it, so later kernel launches do not report it
    info.error = describe_error(err, "cudaGetDeviceCount", info);
    return info;
  }
  info.device_count = count;
  for (int index = 0; index < count; ++index) {
    cudaDeviceProp prop;
    err = cudaGetDeviceProperties(&prop, index);
    if (err != cudaSuccess) {
      cudaGetLastError();
      info.error = describe_error(err, ("cudaGetDeviceProperties(" + std::to_string(index) + ")").c_str(), info);
      continue;
    }
    info.devices.push_back({index, prop.name, {prop.major, prop.minor}, prop.multiProcessorCount,
                            prop.totalGlobalMem, prop.l2CacheSize, prop.sharedMemPerBlockOptin});
  }
  return info;
}

py::dict cuda_info() {
  CudaInfo info;
  {
    py::gil_scoped_release release;  // the first call initialises the driver, which can take a while
    info = query_cuda();
  }
  py::list devices;
  for (const DeviceInfo& d : info.devices) {
    py::dict device;
    device["index"] = d.index;
    device["name"] = d.name;
    device["capability"] = d.capability;
    device["sm_count"] = d.sm_count;
    device["total_memory"] = d.total_memory;
    device["l2_cache_size"] = d.l2_cache_size;
    device["max_shared_memory_per_block_optin"] = d.max_shared_memory_per_block_optin;
    devices.append(device);
  }
  py::dict result;
  result["runtime_version"] = cuda_version_string(info.runtime_version);
  result["driver_version"] =
      info.driver_version > 0 ? py::object(py::str(cuda_version_string(info.driver_version))) : py::none();
  result["device_count"] = info.device_count;
  result["devices"] = devices;
  result["compiled_archs"] = compiled_archs();
  result["error"] = info.error.empty() ? py::object(py::none()) : py::object(py::str(info.error));
  return result;
}

py::dict build_info() {
  py::dict result;
  result["cuda_version_compiled"] = cuda_version_string(CUDART_VERSION);
  result["archs"] = compiled_archs();
  result["compiler"] = DINOTXT_FAST_CXX_COMPILER;
  result["cuda_compiler"] = DINOTXT_FAST_CUDA_COMPILER;
  result["cudart"] = "static";
  result["version"] = DINOTXT_FAST_VERSION;
  return result;
}

}  // namespace

void bind_pooling(pybind11::module_& m);
void bind_dense(pybind11::module_& m);
void bind_contrastive(pybind11::module_& m);
void bind_attention(pybind11::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "dinotxt-fast CUDA kernels (raw device pointers and stream handles; no torch C++ ABI)";
  m.def("cuda_info", &cuda_info,
        "CUDA runtime/driver versions and visible devices as seen by this extension; never raises: "
        "without a GPU or driver, device_count is 0 and 'error' says why.");
  m.def("build_info", &build_info, "How this extension was compiled: CUDA version, architectures, compilers.");
  bind_pooling(m);
  bind_dense(m);
  bind_contrastive(m);
  bind_attention(m);
}
