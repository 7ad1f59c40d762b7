// The one C++/Python boundary of dlm_kernels._C. Each op keeps its own section; the Python side
// wraps these functions in torch.library custom ops (dlm_kernels/ops/*.py) so that autograd and
// torch.compile see them. Input checks (TORCH_CHECK) live at the top of each op's entry point.
#include <torch/extension.h>

#include "masked_cross_entropy.h"
#include "unmask_sample.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dlm-kernels CPU kernels";

  // ---- masked cross-entropy (csrc/masked_cross_entropy.cpp) ----
  m.def("masked_ce_fwd", &dlm::masked_ce_fwd, "per-row masked CE loss and logsumexp",
        py::arg("logits"), py::arg("target"), py::arg("valid"), py::arg("weight"),
        py::arg("label_smoothing"), py::arg("z_loss"), py::arg("write_grad") = false);
  m.def("masked_ce_bwd", &dlm::masked_ce_bwd, "gradient of the per-row masked CE loss",
        py::arg("grad"), py::arg("logits"), py::arg("target"), py::arg("valid"),
        py::arg("weight"), py::arg("lse"), py::arg("label_smoothing"), py::arg("z_loss"));

  // ---- unmask-sample (csrc/unmask_sample.cpp) ----
  m.def("sample_rows", &dlm::sample_rows, "per-row filter + Gumbel-max draw + confidence",
        py::arg("logits"), py::arg("rows"), py::arg("valid"), py::arg("temperature"),
        py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("mode"), py::arg("seed"),
        py::arg("offset"), py::arg("seeds"), py::arg("offsets"), py::arg("has_topk"),
        py::arg("has_topp"), py::arg("has_minp"));
  m.def("commit_rows", &dlm::commit_rows, "the commit rule of unmask_step over (B, L)",
        py::arg("x"), py::arg("tok"), py::arg("conf"), py::arg("cand"), py::arg("rule"),
        py::arg("num_transfer"), py::arg("threshold"), py::arg("factor"), py::arg("alg_temp"),
        py::arg("theta"), py::arg("seed"), py::arg("offset"), py::arg("seeds"),
        py::arg("offsets"), py::arg("left_pad"), py::arg("pos") = py::none());
  m.def("simd_path", &dlm::simd_path, "\"avx2\" if the explicit AVX2 paths were compiled in");
  m.def("built_for_native", &dlm::built_for_native, "whether the build used -march=native");
  m.def("philox4x32", &dlm::philox4x32, "Philox4x32-10 words (n, 4) for counters (c0, c1, c2, c3)",
        py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("seed"));

  // ---- linear cross-entropy (csrc/linear_cross_entropy.cpp) ----
}
