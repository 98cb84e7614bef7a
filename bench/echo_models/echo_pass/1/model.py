"""Baseline model: passes its inputs through (what an empty python model costs in the ensemble's first step)."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("TEXT", pb_utils.get_input_tensor_by_name(r, "text_input").as_numpy()),
            pb_utils.Tensor("COUNT", pb_utils.get_input_tensor_by_name(r, "max_tokens").as_numpy())])
            for r in requests]
