// What the two source files of scratchgpt's CPU kernels share (model/native.py builds them as one extension).
#pragma once

#include <torch/extension.h>

#include <string>

// The steps both entry points take around a kernel (quantized_linear.cpp): x (..., K) of any float dtype
// as a contiguous float32 (M, K); the bias as float32 (nullptr for None; `holder` keeps the copy alive);
// the (M, N) result back in x's shape and dtype.
at::Tensor as_rows(const at::Tensor& x);
const float* bias_of(const c10::optional<at::Tensor>& bias, int64_t N, at::Tensor& holder);
at::Tensor shaped_like(const at::Tensor& y, const at::Tensor& x, int64_t N);

// float_linear.cpp
at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
std::string float_instruction_set();
