"""`python -m steerlm.api`: the OpenAI-compatible and NeMo HTTP API alone, in front of a running Triton.

`make serve` starts the same API beside the tritonserver it launches; this runs it on its own, for a Triton
started elsewhere (another host's sidecar, a benchmark that wants the API in its own process)."""

from __future__ import annotations

import click
import uvicorn

from steerlm.api.app import create_app


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The served SteerLM checkpoint (read for its schema, template and tokenizer; no weights).")
@click.option("--triton-grpc", required=True, help="The Triton server's gRPC address, host:port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; keep loopback unless "
              "you mean to expose the API.")
@click.option("--port", default=8080, show_default=True, help="Port to bind.")
@click.option("--triton-model", default="steerlm", show_default=True, help="The ensemble to send requests to.")
@click.option("--served-name", default="steerlm", show_default=True, help="The model name clients ask for.")
@click.option("--cancel-socket", type=click.Path(dir_okay=False), default=None,
              help="The generator's local channel (<repository>/.run/generator.sock) when Triton runs on this "
              "machine: a client that goes away is then also ended in the engine.")
def main(model_dir, triton_grpc, host, port, triton_model, served_name, cancel_socket) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models, /health and NeMo's /generate on HOST:PORT."""
    app = create_app(model_dir, triton_grpc, triton_model=triton_model, served_name=served_name,
                     cancel_socket=cancel_socket)
    click.echo(f"OpenAI base URL: http://{host}:{port}/v1   (Triton gRPC {triton_grpc}, ensemble {triton_model})")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
