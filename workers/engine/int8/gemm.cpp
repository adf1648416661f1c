// llm_server::int8_gemm in C++: fbgemm's INT8 GEMM on weights looked up by key.
//
// Compiled decode steps call this op once per linear layer. Implemented in Python, each call pays for the
// dispatcher to box its arguments and enter the interpreter (BENCHMARKS.md, Targets, says what that cost);
// here it is a plain C++ kernel. The key is a tensor so that one compiled graph serves every layer (an int
// would be baked into the graph).
// workers/engine/int8/gemm.py builds this file on first use and falls back to a Python kernel of the same op.
#include <ATen/native/quantized/PackedParams.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>

namespace {

using PackedWeights = c10::intrusive_ptr<LinearPackedParamsBase>;

std::mutex registry_mutex;
std::unordered_map<int64_t, PackedWeights> packed_weights;

void keep_packed(int64_t key, PackedWeights packed) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  packed_weights[key] = std::move(packed);
}

void drop_packed(int64_t key) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  packed_weights.erase(key);
}

// rows: [..., in] already scaled into [-1, 1]; quantized with `levels` codes per sign around levels + 1.
at::Tensor int8_gemm(const at::Tensor& rows, const at::Tensor& weights_key, int64_t out_features, int64_t levels) {
  PackedWeights packed;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    packed = packed_weights.at(weights_key.item<int64_t>());
  }
  return packed->apply_with_input_q_dq_qweight_dq_output_fp32(rows, 1.0 / levels, levels + 1);
}

}  // namespace

TORCH_LIBRARY(llm_server, m) {
  m.def("keep_packed(int key, __torch__.torch.classes.quantized.LinearPackedParamsBase packed) -> ()", keep_packed);
  m.def("drop_packed(int key) -> ()", drop_packed);
  m.def("int8_gemm(Tensor rows, Tensor weights_key, int out_features, int levels) -> Tensor");
  m.impl("int8_gemm", c10::DispatchKey::CPU, TORCH_FN(int8_gemm));
}
