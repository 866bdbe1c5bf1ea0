// Device memory for the symmetric buffers and its CUDA IPC sharing: allocation, handles, opening peers' handles.
// Every function takes the device index explicitly and restores the caller's current device.
#include <cuda_runtime.h>
#include <cstring>
#include <string>
#include "../include/api.cuh"
#include "../include/exception.cuh"

namespace moe_comm {
namespace {

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    MC_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) MC_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

}  // namespace

uint64_t device_alloc_zeroed(int device, size_t bytes) {
  MC_CHECK(bytes > 0, "bytes must be > 0");
  DeviceGuard guard(device);
  void* ptr = nullptr;
  MC_CUDA_CHECK(cudaMalloc(&ptr, bytes));
  cudaError_t err = cudaMemset(ptr, 0, bytes);
  if (err != cudaSuccess) {
    cudaFree(ptr);
    MC_CUDA_CHECK(err);
  }
  MC_CUDA_CHECK(cudaDeviceSynchronize());
  return reinterpret_cast<uint64_t>(ptr);
}

void device_free(int device, uint64_t ptr) {
  DeviceGuard guard(device);
  MC_CUDA_CHECK(cudaFree(reinterpret_cast<void*>(ptr)));
}

std::string ipc_get_handle(int device, uint64_t ptr) {
  DeviceGuard guard(device);
  cudaIpcMemHandle_t handle;
  MC_CUDA_CHECK(cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(ptr)));
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

uint64_t ipc_open_handle(int device, const std::string& bytes) {
  MC_CHECK(bytes.size() == sizeof(cudaIpcMemHandle_t), "handle: expected " + std::to_string(sizeof(cudaIpcMemHandle_t)) +
                                                           " bytes, got " + std::to_string(bytes.size()));
  DeviceGuard guard(device);
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, bytes.data(), sizeof(handle));
  void* ptr = nullptr;
  MC_CUDA_CHECK(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess));
  return reinterpret_cast<uint64_t>(ptr);
}

void ipc_close_handle(int device, uint64_t ptr) {
  DeviceGuard guard(device);
  MC_CUDA_CHECK(cudaIpcCloseMemHandle(reinterpret_cast<void*>(ptr)));
}

int device_attribute(int device, const std::string& name) {
  cudaDeviceAttr attr;
  if (name == "clock_rate_khz") attr = cudaDevAttrClockRate;
  else if (name == "sm_count") attr = cudaDevAttrMultiProcessorCount;
  else throw Error("name: unknown device attribute '" + name + "'", __FILE__, __LINE__);
  int value = 0;
  MC_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

}  // namespace moe_comm
