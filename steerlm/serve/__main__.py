"""`python -m steerlm.serve`: render the SteerLM Triton repository and run tritonserver (`make serve`)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import click

from steerlm.serve.ipc import socket_path
from steerlm.serve.launch import trtllm_command
from steerlm.serve.repository import RenderError, render_repository
from steerlm.serve.requests import DEFAULT_MAX_INPUT_BYTES
from steerlm.serve.triton import ServerError, TritonServer, server_env, shell_line


def _run_paths(repo_dir: str | None) -> tuple[Path, Path | None]:
    """The model repository and the work directory for the backend links and log (None: a temporary one).

    They are separate folders: tritonserver takes every folder in a repository for a model."""
    if repo_dir:
        repo = Path(repo_dir).resolve()
        return repo, repo.with_name(repo.name + "-run")
    return Path(tempfile.mkdtemp(prefix="steerlm-serve-")) / "models", None


def _banner(server_http: str, server_grpc: str, metrics: str, repo: Path, log: Path | None, backend: str) -> str:
    lines = [
        f"SteerLM is being served by Triton ({backend} backend). Endpoints:",
        f"  HTTP     http://{server_http}   (POST /v2/models/steerlm/generate, /generate_stream; "
        "/v2/models/steerlm_whole/infer)",
        f"  gRPC     {server_grpc}   (model 'steerlm' through ModelStreamInfer; 'steerlm_whole' through "
        "unary ModelInfer)",
        f"  metrics  {metrics}",
        f"  repository {repo}" + (f"   log {log}" if log else ""),
        "Try:",
        f'  python client/query.py "Where and when did techno music originate?" --attr verbosity=4 --stream '
        f"--url {server_grpc}",
    ]
    return "\n".join(lines)


class _Stop(BaseException):
    """Ctrl-C or SIGTERM: raised in the main thread at any moment, so every exit path cleans up."""


def _raise_stop(*_) -> None:
    raise _Stop()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False),
              help="SteerLM checkpoint (HF weights + tokenizer.json + steerlm.json), or what `make engine` wrote.")
@click.option("--reward-model", "reward_model_dir", type=click.Path(exists=True, file_okay=False),
              help="Also serve this attribute (reward) model as `reward_model`.")
@click.option("--backend", type=click.Choice(["cpu", "torch", "trtllm"]), default="cpu", show_default=True,
              help="cpu: the PyTorch engine on the CPU; torch: the PyTorch engine on --device (cuda: bf16); "
                   "trtllm: TensorRT-LLM's LLM API (GPU; docs/serving-gpu.md).")
@click.option("--device", default=None, help="torch backend: cpu, cuda or cuda:N [default: cpu].")
@click.option("--engine-dir", type=click.Path(exists=True, file_okay=False),
              help="trtllm: load the engine from this `make engine` output instead of --model.")
@click.option("--tp", type=int, default=None,
              help="trtllm: tensor-parallel size [default: the engine's extra_llm_api_options.yaml, else 1].")
@click.option("--http-port", default=8000, show_default=True, help="HTTP port (0: any free port).")
@click.option("--grpc-port", default=8001, show_default=True, help="gRPC port (0: any free port).")
@click.option("--metrics-port", default=8002, show_default=True, help="Metrics port (0: any free port).")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to bind. Keep loopback unless you mean to expose the server.")
@click.option("--repo-dir", type=click.Path(file_okay=False),
              help="Render the model repository here (kept; default: a temporary directory).")
@click.option("--max-batch-size", default=8, show_default=True, help="Requests generated together at most.")
@click.option("--max-prefill-tokens", type=click.IntRange(min=1), default=None,
              help="cpu/torch: padded prompt tokens one prefill forward may hold (requests that arrived together "
                   "are prefilled together up to this; a longer prompt runs alone) [default: 2048, vLLM's "
                   "max_num_batched_tokens].")
@click.option("--max-input-bytes", default=DEFAULT_MAX_INPUT_BYTES, show_default=True,
              help="Largest text input (each of text_input, system, history, attributes, every stop/bad word), "
                   "checked before it is read.")
@click.option("--stall-timeout", default=120.0, show_default=True,
              help="Seconds the engine may make no progress with requests pending before the server is stopped.")
@click.option("--tritonserver", "tritonserver_bin", default=None,
              help="trtllm: tritonserver executable [default: /opt/tritonserver/bin/tritonserver or PATH].")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for the server to be ready.")
@click.option("--api-port", default=8080, show_default=True,
              help="OpenAI-compatible and NeMo /generate HTTP API port (0: any free port; -1: no API).")
@click.option("--triton-model-name", "nemo_model_name", default=None,
              help="Also serve the model NeMo's NemoQueryLLM queries (raw SteerLM prompts in, `outputs` out) "
                   "under this name, as NeMo's deploy script takes it (docs/serving.md, NemoQuery).")
@click.option("--dry-run", is_flag=True, help="Render the repository and print the server command; start nothing.")
def main(model_dir, reward_model_dir, backend, device, engine_dir, tp, http_port, grpc_port, metrics_port, address,
         repo_dir, max_batch_size, max_prefill_tokens, max_input_bytes, stall_timeout, tritonserver_bin, timeout, api_port,
         nemo_model_name, dry_run) -> None:
    """Serve a SteerLM model through the Triton ensemble `steerlm` (also `ensemble`; and `reward_model` with
    --reward-model).

    The cpu/torch backends run the bundled tritonserver here, wait until it is ready, print the endpoints and
    run until Ctrl-C; the command exits non-zero, naming the cause, if the server or its generator dies. The
    trtllm backend renders the same repository with the TensorRT-LLM LLM API engine and runs one tritonserver
    (its engine starts the workers of other tensor-parallel ranks itself)."""
    if model_dir is None and reward_model_dir is None:
        raise click.UsageError("give --model (and/or --reward-model)")
    if backend != "trtllm" and (engine_dir or tp not in (None, 1)):
        raise click.UsageError("--engine-dir and --tp belong to --backend trtllm")
    if backend != "torch" and device is not None:
        raise click.UsageError("--device belongs to --backend torch")
    if backend == "trtllm" and max_prefill_tokens is not None:
        raise click.UsageError("--max-prefill-tokens belongs to the cpu and torch backends")
    engine_options = {"tensor_parallel_size": tp} if backend == "trtllm" and tp is not None else {}
    if max_prefill_tokens is not None:
        engine_options["max_prefill_tokens"] = max_prefill_tokens
    if backend == "trtllm" and model_dir is not None:
        from steerlm.serve.llmapi import LLMAPIError, preflight, read_layout

        try:
            layout = read_layout(engine_dir or model_dir, engine_options)
        except LLMAPIError as exc:
            raise click.ClickException(str(exc)) from None
        if engine_dir is None and layout.tokenizer != Path(model_dir):
            # A legacy engine output keeps the template next to the engine: render from there.
            engine_dir, model_dir = model_dir, str(layout.tokenizer)
        try:
            preflight(engine_dir or model_dir, engine_options)
        except LLMAPIError as exc:
            if not dry_run:
                raise click.ClickException(str(exc)) from None
            click.echo(f"warning: {exc}", err=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    repo, workdir = _run_paths(repo_dir)
    temporary = workdir is None
    try:
        try:
            render_repository(repo, model_dir, reward_model_dir, backend=backend, engine_dir=engine_dir,
                              max_batch_size=max_batch_size, device=device, engine_options=engine_options,
                              max_input_bytes=max_input_bytes, stall_timeout=stall_timeout,
                              nemo_model_name=nemo_model_name)
        except (RenderError, FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"rendered the {backend} model repository into {repo}")
        if backend == "trtllm":
            cmd = trtllm_command(repo, http_port, grpc_port, metrics_port, address, tritonserver_bin)
            click.echo("server command:\n  " + " ".join(shlex.quote(c) for c in cmd))
            if not dry_run:
                _run_foreground(cmd)
            return
        # Ports given as 0 are picked by TritonServer, which picks again should one be taken before it binds.
        server = TritonServer(repo_dir=repo, workdir=workdir or repo.parent, http_port=http_port,
                              grpc_port=grpc_port, metrics_port=metrics_port, timeout=timeout,
                              log_file=None if not temporary else _log_path())
        if dry_run:
            click.echo("server command (run it from any shell):\n  " + shell_line(server.command()))
            return
        _serve(server, backend, api=(model_dir, api_port))
    except _Stop:
        click.echo("stopped.", err=True)
    finally:
        if temporary:
            shutil.rmtree(repo.parent, ignore_errors=True)


def _log_path() -> Path:
    """The server log of a temporary repository: outside it, so that it survives to be read after a failure."""
    return Path(tempfile.gettempdir()) / f"steerlm-serve-{os.getpid()}.log"


def _serve(server: TritonServer, backend: str, api: tuple[str | None, int]) -> None:
    from steerlm.api.server import beside

    failed = True
    try:
        try:
            server.start()
        except ServerError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(_banner(server.http_url, server.grpc_url, server.metrics_url, server.repo_dir, server.log_path,
                           backend))
        with beside(api[0], server.grpc_url, api[1], click.echo, cancel_socket=socket_path(server.repo_dir)):
            click.echo("Ctrl-C stops the server.")
            while True:
                time.sleep(0.5)
                problem = server.check_health()
                if problem:
                    raise click.ClickException(f"stopping: {problem}")
    except _Stop:
        failed = False
        raise
    finally:
        click.echo("stopping tritonserver ...", err=True)
        server.stop()
        if not failed and server.log_path.parent != server.workdir:
            server.log_path.unlink(missing_ok=True)
def _run_foreground(cmd: list[str]) -> None:
    import subprocess

    try:
        proc = subprocess.Popen(cmd, env=server_env())
    except FileNotFoundError:
        raise click.ClickException(
            f"{cmd[0]} not found: run this inside NVIDIA's Triton TensorRT-LLM container "
            f"nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3 (or pass --tritonserver)") from None
    try:
        sys.exit(proc.wait())
    except _Stop:
        proc.terminate()
        sys.exit(proc.wait())


if __name__ == "__main__":
    main()
