// The GPUs of this machine for `bigmoe plan` (plan::set_gpu_probe): name, memory, device memory
// bandwidth (a 256 MiB device-to-device copy, (read + written) / time, best of 3), pinned
// host-to-device bandwidth (256 MiB, best of 3), the NUMA node of the PCI device, and a GEMM
// throughput estimate. Returns nothing (and says so in notes) without a device.
#pragma once
#include <string>
#include <vector>

#include "plan/machine.h"

namespace bigmoe::cuda {

std::vector<plan::GpuSpec> probe_gpus(std::vector<std::string>& notes);

}  // namespace bigmoe::cuda
