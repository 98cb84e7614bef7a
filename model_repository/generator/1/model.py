"""Triton python model `generator`: the engine and every request's text stream in one process.

Triton loads it (its stub process holds the engine; its metrics and log are Triton's), but requests reach it
only over its local socket (steerlm.serve.ipc): streamed from the `steerlm` relay, whole from
`generator_whole` and the NeMo model. Its own execute() refuses every request. The logic is
`steerlm.serve.generator` (tested without a server). The engine comes from
`steerlm.serve.engines.create_engine`, chosen by the `generation_engine` parameter.
"""

import json
import os
from pathlib import Path

import triton_python_backend_utils as pb_utils

from steerlm.serve.engines import create_engine
from steerlm.serve.generator import GeneratorCore, Watchdog
from steerlm.serve.ipc import IpcServer
from steerlm.serve.requests import load_key
from steerlm.serve.triton import STALL_MARK
from steerlm.spec import load_spec
from steerlm.tokenize import load_tokenizer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
REFUSED = ("the generator takes no requests of its own: send yours to steerlm (or ensemble) to stream, "
           "steerlm_whole for unary infer()")


class Metrics:
    """Engine counters on Triton's metrics endpoint (also how tests see the work done after a cancel)."""

    def __init__(self):
        self._families = []  # a Metric needs its MetricFamily alive

        def family(name, kind, doc):
            self._families.append(pb_utils.MetricFamily(name=name, description=doc, kind=kind))
            return self._families[-1].Metric(labels={"model": "generator"})

        self.steps = family("steerlm_engine_steps_total", pb_utils.MetricFamily.COUNTER,
                            "Prefills and decode steps the generation engine ran")
        self.tokens = family("steerlm_engine_tokens_total", pb_utils.MetricFamily.COUNTER, "Tokens sampled")
        self.running = family("steerlm_engine_running", pb_utils.MetricFamily.GAUGE,
                              "Requests in the running batch")
        self.pending = family("steerlm_engine_pending", pb_utils.MetricFamily.GAUGE,
                              "Requests running or waiting to join")
        self.cancelled = family("steerlm_requests_cancelled_total", pb_utils.MetricFamily.COUNTER,
                                "Requests the engine dropped because they were cancelled")
        self._seen = (0, 0)

    def update(self, engine):
        steps, tokens = getattr(engine, "steps", 0), getattr(engine, "tokens", 0)
        self.steps.increment(steps - self._seen[0])
        self.tokens.increment(tokens - self._seen[1])
        self._seen = (steps, tokens)
        self.running.set(getattr(engine, "running", 0))
        self.pending.set(engine.pending() if hasattr(engine, "pending") else 0)


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        model_dir = params["model_dir"]
        options = json.loads(params.get("engine_options") or "{}")
        self.engine = create_engine(params.get("generation_engine", "torch"), params.get("engine_dir") or model_dir,
                                    max_batch_size=int(params["max_batch_size"]), **options)
        self.metrics = metrics = Metrics()
        self.core = GeneratorCore(self.engine, load_tokenizer(model_dir), load_spec(model_dir).template.answer_end,
                                  load_key(Path(args["model_repository"]).parent), on_cancel=self._cancelled)
        # Every request comes over this local channel: streams from the steerlm relay, whole answers from
        # generator_whole and the NeMo model.
        self.ipc = IpcServer(self.core, params["ipc_socket"])
        self.watchdog = Watchdog(self.engine, float(params.get("stall_timeout", 120)), self._stalled,
                                 on_tick=metrics.update)

    def _cancelled(self, record):
        # One line per cancelled request: how it was cancelled, what it had cost, and when its row left the
        # batch on CLOCK_MONOTONIC (system-wide), so a client on this machine can measure the delay.
        self.metrics.cancelled.increment(1)
        pb_utils.Logger.log_info(record.log_line())

    @staticmethod
    def _stalled(message):
        # A generator that cannot make progress must not look healthy: end this stub process, which the
        # launcher (`make serve`) notices and reports (see steerlm.serve.triton.TritonServer.check_health).
        pb_utils.Logger.log_error(f"{STALL_MARK} {message}; ending the generator process")
        os._exit(70)

    def execute(self, requests):
        for request in requests:
            request.get_response_sender().send(pb_utils.InferenceResponse(error=pb_utils.TritonError(REFUSED)),
                                               flags=FINAL)
        return None

    def finalize(self):
        self.ipc.close()
        self.watchdog.stop()
        self.engine.close()
