"""Ask a SteerLM model served by Triton a question, steering the answer with attribute values.

    python client/query.py "Where and when did techno music originate?" --attr verbosity=4 --stream
    python client/query.py --chat --attr creativity=3          # interactive multi-turn chat
"""

from __future__ import annotations

import json
from pathlib import Path

import click

# Python puts the directory of a script it runs first on the import path, so `python client/query.py` finds
# steerlm_client next to this file whether or not the package is installed.
from steerlm_client import SteerClient, SteerError
from steerlm_client.client import DEFAULT_URLS, PROTOCOLS


def parse_attrs(items: tuple[str, ...]) -> dict[str, int]:
    attrs: dict[str, int] = {}
    for item in items:
        sep = "=" if "=" in item else ":"
        name, found, value = item.partition(sep)
        if not found or not name.strip():
            raise click.BadParameter(f"{item!r} must look like name=value, e.g. verbosity=4", param_hint="--attr")
        try:
            attrs[name.strip()] = int(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: the value must be an integer", param_hint="--attr") from None
    return attrs


def load_history(path: str | None) -> list[dict]:
    if not path:
        return []
    try:
        turns = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--history") from None
    if not isinstance(turns, list) or not all(isinstance(t, dict) and {"question", "answer"} <= t.keys() for t in turns):
        raise click.BadParameter(f'{path} must hold a JSON list of {{"question": ..., "answer": ...}} objects',
                                 param_hint="--history")
    return turns


def ask(client: SteerClient, question: str, stream: bool, print_prompt: bool, **kwargs) -> str:
    """Print the answer (and the server's prompt first with --print-prompt); return the answer text."""
    if stream:
        answer = client.stream(question, **kwargs)
        pieces = []
        for piece in answer:
            if print_prompt and not pieces and answer.prompt is not None:
                click.echo(answer.prompt, nl=False)
            pieces.append(piece)
            click.echo(piece, nl=False)
        if print_prompt and not pieces and answer.prompt is not None:
            click.echo(answer.prompt, nl=False)
        click.echo()
        return "".join(pieces)
    completion = client.complete(question, **kwargs)
    if print_prompt:
        click.echo(completion.prompt, nl=False)
    click.echo(completion.text)
    return completion.text


def chat(client: SteerClient, first: str | None, history: list[dict], attrs: dict[str, int], stream: bool,
         print_prompt: bool, **kwargs) -> None:
    click.echo("SteerLM chat. Commands: /attr name=value (change an attribute), /reset (forget the conversation), "
               "/exit. Ctrl-D also ends.", err=True)
    question = first
    while True:
        if question is None:
            try:
                question = input("you> ")
            except EOFError:
                click.echo(err=True)
                return
        question = question.strip()
        if question in ("/exit", "/quit"):
            return
        if question.startswith("/attr "):
            try:
                attrs.update(parse_attrs(tuple(question.split()[1:])))
                click.echo(f"attributes: {attrs}", err=True)
            except click.BadParameter as exc:
                click.echo(f"error: {exc.message}", err=True)
        elif question == "/reset":
            history.clear()
            click.echo("conversation forgotten", err=True)
        elif question:
            click.echo("assistant> ", nl=False, err=True)
            try:
                answer = ask(client, question, stream, print_prompt, history=history, attributes=attrs, **kwargs)
            except SteerError as exc:
                click.echo(f"error: {exc}", err=True)
            else:
                history.append({"question": question, "answer": answer, "attributes": dict(attrs)})
        question = None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("question", required=False)
@click.option("--attr", "attrs", multiple=True, metavar="NAME=VALUE",
              help="Attribute value, repeatable (e.g. --attr verbosity=4 --attr creativity=1). "
                   "Attributes left out take the model's defaults.")
@click.option("--system", default=None, help="System prompt [default: the model's].")
@click.option("--history", "history_file", type=click.Path(dir_okay=False), default=None,
              help='JSON file with earlier turns: [{"question": ..., "answer": ..., "attributes": "verbosity:2"}].')
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="grpc", show_default=True)
@click.option("--url", default=None, metavar="HOST:PORT",
              help=f"Server endpoint [default: {DEFAULT_URLS['grpc']} for grpc, {DEFAULT_URLS['http']} for http].")
@click.option("--stream", is_flag=True, help="Print the answer as it is generated.")
@click.option("--max-tokens", default=256, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", type=float, default=None,
              help="Sampling temperature (enables sampling with top_p=1 unless --top-k/--top-p are given).")
@click.option("--top-k", type=int, default=None, help="Sample from the K most likely tokens (1: greedy).")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling mass in (0, 1].")
@click.option("--seed", type=int, default=None, help="Random seed for sampling (same seed, same answer).")
@click.option("--stop", "stop_words", multiple=True, help="Extra stop string, repeatable (never printed).")
@click.option("--print-prompt", is_flag=True, help="Print the exact prompt the server rendered before the answer.")
@click.option("--chat", "chat_mode", is_flag=True, help="Interactive multi-turn chat (QUESTION, if given, opens it).")
@click.option("--model", "model_name", default="steerlm", show_default=True, help="Triton model to query.")
def main(question, attrs, system, history_file, protocol, url, stream, max_tokens, temperature, top_k, top_p, seed,
         stop_words, print_prompt, chat_mode, model_name) -> None:
    """Send QUESTION to the SteerLM ensemble and print the answer.

    Greedy decoding unless --temperature, --top-k or --top-p asks for sampling. Errors from the server
    (unknown attribute, value out of range, ...) are printed and exit with status 1."""
    if question is None and not chat_mode:
        raise click.UsageError("give a QUESTION (or --chat)")
    if temperature is not None and temperature > 0 and top_k is None and top_p is None:
        top_p = 1.0  # TensorRT-LLM samples only when top_k or top_p asks for it
    client = SteerClient(url, protocol, model=model_name)
    kwargs = dict(system=system, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=seed, stop_words=list(stop_words) or None)
    history = load_history(history_file)
    attributes = parse_attrs(attrs)
    if chat_mode:
        chat(client, question, history, attributes, stream, print_prompt, **kwargs)
        return
    try:
        ask(client, question, stream, print_prompt, history=history, attributes=attributes, **kwargs)
    except SteerError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
