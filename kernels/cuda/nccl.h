// NCCL collectives (kernels/ops.h GrokitCollectives), loaded at first use from
// libnccl.so.2 with dlopen, so the plugin neither links nor needs NCCL to load.
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

// The table; static, never NULL. Its available() says whether NCCL could be loaded.
const GrokitCollectives* grokit_cuda_collectives_table();

}  // namespace grokit::kernels::cuda
