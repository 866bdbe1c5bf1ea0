// One exception type for the whole extension; carries file:line and reaches Python as RuntimeError.
#pragma once
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace moe_comm {

class Error : public std::runtime_error {
 public:
  Error(const std::string& what, const char* file, int line)
      : std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + what) {}
};

}  // namespace moe_comm

#define MC_CHECK(cond, msg)                                                  \
  do {                                                                       \
    if (!(cond)) throw ::moe_comm::Error(std::string(msg), __FILE__, __LINE__); \
  } while (0)

#define MC_CUDA_CHECK(expr)                                                              \
  do {                                                                                   \
    cudaError_t mc_err_ = (expr);                                                        \
    if (mc_err_ != cudaSuccess)                                                          \
      throw ::moe_comm::Error(std::string(#expr) + " failed: " + cudaGetErrorString(mc_err_), \
                              __FILE__, __LINE__);                                       \
  } while (0)

#define MC_LAUNCH_CHECK() MC_CUDA_CHECK(cudaGetLastError())
