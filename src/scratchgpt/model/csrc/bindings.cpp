// The Python module of scratchgpt's CPU kernels: the only file that includes torch's Python bindings
// (model/native.py builds it with the kernel files as one extension). Kept apart so that the kernels,
// compiled once per instruction set, include only ATen's light headers (kernels.h).

#include <torch/csrc/utils/pybind.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear", &int4_linear, "y = x W^T + b for group-wise int4 W (scratchgpt's stored layout)");
  m.def("int8_linear", &int8_linear, "y = x W^T + b for int8 W with one scale per row (as stored)");
  m.def("float_linear", &float_linear, "y = x W^T + b for a few rows x and float32 or bfloat16 W (N, K)");
  m.def("blocks_decode", &blocks_decode, "new tokens of one sequence through all blocks, their KV caches written");
  m.def("instruction_set", &instruction_set, "which code path this build runs");
  m.def("float_instruction_set", &float_instruction_set, "which code path float_linear runs");
}
