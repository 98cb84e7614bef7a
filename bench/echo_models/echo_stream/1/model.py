"""Baseline model: streams COUNT responses of one character each, from its own thread, with nothing else."""

import queue
import threading

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.jobs = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def execute(self, requests):
        for r in requests:
            count = int(pb_utils.get_input_tensor_by_name(r, "COUNT").as_numpy().reshape(-1)[0])
            self.jobs.put((r.get_response_sender(), count))
        return None

    def _run(self):
        piece = np.array([[b"x"]], dtype=np.object_)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            sender, count = job
            for i in range(count):
                response = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", piece)])
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if i == count - 1 else 0)

    def finalize(self):
        self.jobs.put(None)
        self.thread.join()
