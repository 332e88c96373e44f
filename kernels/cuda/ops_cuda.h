// The CUDA backend's device-op table (kernels/ops.h), exported by the plugin as
// grokit_cuda_ops().
#pragma once

#include "kernels/ops.h"

namespace grokit::kernels::cuda {

// The table (backend "cuda"); static, never NULL.
const GrokitOps* grokit_cuda_ops_table();

}  // namespace grokit::kernels::cuda
