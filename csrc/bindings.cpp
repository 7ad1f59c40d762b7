// The one C++/Python boundary of dlm_kernels._C. Each op keeps its own section; the Python side
// wraps these functions in torch.library custom ops (dlm_kernels/ops/*.py) so that autograd and
// torch.compile see them. Input checks (TORCH_CHECK) live at the top of each op's entry point.
#include <torch/extension.h>

#include "masked_cross_entropy.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dlm-kernels CPU kernels";

  // ---- masked cross-entropy (csrc/masked_cross_entropy.cpp) ----
  m.def("masked_ce_fwd", &dlm::masked_ce_fwd, "per-row masked CE loss and logsumexp",
        py::arg("logits"), py::arg("target"), py::arg("valid"), py::arg("weight"),
        py::arg("label_smoothing"), py::arg("z_loss"));
  m.def("masked_ce_bwd", &dlm::masked_ce_bwd, "gradient of the per-row masked CE loss",
        py::arg("grad"), py::arg("logits"), py::arg("target"), py::arg("valid"),
        py::arg("weight"), py::arg("lse"), py::arg("label_smoothing"), py::arg("z_loss"));

  // ---- unmask-sample (csrc/unmask_sample.cpp) ----

  // ---- linear cross-entropy (csrc/linear_cross_entropy.cpp) ----
}
