"""The TensorRT-LLM LLM-API engine (steerlm/serve/llmapi.py).

On CPU, `LLMAPIEngine` runs for real against tests/serving/llmapi_facade.py: the LLM API's surface with
upstream's names over the CPU torch engine, so the request mapping, streaming, stop/bad words, seeds, end ids,
cancellation and errors go through the same code path as on a GPU. The GPU test at the end needs TensorRT-LLM.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import threading

import pytest
import torch

from steerlm.generation import Engine
from steerlm.sampling import GenerationRequest, SamplingParams
from steerlm.serve import llmapi
from steerlm.serve.llmapi import (
    INSTALL_HINT,
    BannedSequences,
    LLMAPIEngine,
    LLMAPIError,
    check_version,
    llm_kwargs,
    llmapi_sampling_kwargs,
    load_llm,
    read_layout,
)
from steerlm.serve.requests import RequestBuilder
from tests.serving import llmapi_facade

WAIT_S = 120

# Field names of TensorRT-LLM's SamplingParams: NVIDIA/TensorRT-LLM tensorrt_llm/sampling_params.py at
# commit 000a01de66f0eab4ab05640711f0253f50f5209c (the init fields of `class SamplingParams`).
UPSTREAM_SAMPLING_FIELDS = {
    "end_id", "pad_id", "max_tokens", "bad", "bad_token_ids", "stop", "stop_token_ids",
    "include_stop_str_in_output", "embedding_bias", "logits_processor", "apply_batched_logits_processor", "n",
    "best_of", "use_beam_search", "top_k", "top_p", "top_p_min", "top_p_reset_ids", "top_p_decay", "seed",
    "temperature", "min_tokens", "beam_search_diversity_rate", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "length_penalty", "early_stopping", "no_repeat_ngram_size", "min_p", "beam_width_array",
    "logprobs", "prompt_logprobs", "return_context_logits", "return_generation_logits",
    "exclude_input_from_output", "return_encoder_output", "return_perf_metrics", "additional_model_outputs",
    "lookahead_config", "guided_decoding", "ignore_eos", "detokenize", "add_special_tokens",
    "truncate_prompt_tokens", "skip_special_tokens", "spaces_between_special_tokens",
}


# -- the request mapping (pure) -----------------------------------------------------------------------------
def test_greedy_request_sends_no_sampling_fields():
    # Upstream is greedy when top_k is None/1 and top_p is None/0 (SamplingParams._greedy_decoding).
    kw = llmapi_sampling_kwargs(SamplingParams(max_tokens=7, end_id=2, temperature=0.7), fresh_seed=5)
    assert kw == {"max_tokens": 7, "end_id": 2, "detokenize": False, "include_stop_str_in_output": True}


def test_sampled_request_sends_temperature_top_k_top_p_and_seed():
    kw = llmapi_sampling_kwargs(SamplingParams(max_tokens=3, end_id=2, temperature=0.5, top_k=40, top_p=0.9,
                                               seed=11), fresh_seed=5)
    assert (kw["temperature"], kw["top_k"], kw["top_p"], kw["seed"]) == (0.5, 40, 0.9, 11)


def test_top_p_alone_samples_without_a_top_k_limit():
    kw = llmapi_sampling_kwargs(SamplingParams(max_tokens=3, top_p=0.8), fresh_seed=5)
    assert kw["top_p"] == 0.8 and "top_k" not in kw


def test_unseeded_sampled_request_gets_the_fresh_seed():
    # Upstream's seed=None is the runtime default 0: every unseeded request would draw the same samples.
    kw = llmapi_sampling_kwargs(SamplingParams(max_tokens=3, top_k=5), fresh_seed=1234)
    assert kw["seed"] == 1234


def test_no_end_id_maps_to_ignore_eos():
    kw = llmapi_sampling_kwargs(SamplingParams(max_tokens=3), fresh_seed=5)
    assert kw["ignore_eos"] is True and "end_id" not in kw


def test_single_token_stop_words_map_to_stop_token_ids_and_longer_ones_to_the_adapter():
    params = SamplingParams(max_tokens=3, end_id=2, stop_words=[[7], [8, 9]])
    assert llmapi_sampling_kwargs(params, fresh_seed=5)["stop_token_ids"] == [7]
    assert llmapi.multi_token_stop_words(params) == [[8, 9]]


def test_bad_words_go_to_one_logits_processor_on_the_pytorch_backend():
    params = SamplingParams(max_tokens=3, end_id=2, bad_words=[[4], [5, 6]])
    kw = llmapi_sampling_kwargs(params, fresh_seed=5)
    assert kw["logits_processor"] == BannedSequences([[4], [5, 6]]) and "bad_token_ids" not in kw


def test_a_tensorrt_engine_gets_bad_token_ids_and_refuses_longer_bad_words():
    single = SamplingParams(max_tokens=3, end_id=2, bad_words=[[4], [5]])
    kw = llmapi_sampling_kwargs(single, fresh_seed=5, logits_processors=False)
    assert kw["bad_token_ids"] == [4, 5] and "logits_processor" not in kw
    with pytest.raises(ValueError, match="bad_words: words of more than one token"):
        llmapi_sampling_kwargs(SamplingParams(max_tokens=3, bad_words=[[5, 6]]), logits_processors=False)


def test_min_tokens_and_penalties_are_sent_under_upstream_names_when_set():
    params = SamplingParams(max_tokens=5, end_id=2, min_tokens=4, repetition_penalty=1.2, presence_penalty=0.5,
                            frequency_penalty=-0.5)
    kw = llmapi_sampling_kwargs(params, fresh_seed=5)
    assert (kw["min_tokens"], kw["repetition_penalty"], kw["presence_penalty"], kw["frequency_penalty"]) == (
        4, 1.2, 0.5, -0.5)


def test_every_mapped_name_is_an_upstream_sampling_params_field():
    params = SamplingParams(max_tokens=3, temperature=0.9, top_k=3, top_p=0.5, seed=1, stop_words=[[1]],
                            bad_words=[[2], [3, 4]])
    assert set(llmapi_sampling_kwargs(params, fresh_seed=5)) <= UPSTREAM_SAMPLING_FIELDS
    assert {f.name for f in dataclasses.fields(llmapi_facade.SamplingParams)} <= UPSTREAM_SAMPLING_FIELDS


def test_banned_sequences_forbid_the_last_token_after_its_prefix_only():
    proc = pickle.loads(pickle.dumps(BannedSequences([[5, 6], [1, 2, 3], [8]])))  # pickles to executor workers
    logits = torch.zeros(1, 10)
    proc(0, logits, [[9, 1, 2]], None, None)
    assert torch.isinf(logits[0]).nonzero().flatten().tolist() == [3, 8]
    logits = torch.zeros(1, 10)
    proc(0, logits, [[9, 5]], None, None)
    assert torch.isinf(logits[0]).nonzero().flatten().tolist() == [6, 8]


# -- LLMAPIEngine through the facade over the CPU engine ----------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_model):
    facade = llmapi_facade.LLM(str(tiny_model), max_batch_size=4)
    yield facade
    facade.shutdown()


@pytest.fixture(scope="module")
def engine(llm):
    eng = LLMAPIEngine(llm, llmapi_facade.SamplingParams)
    yield eng
    eng.close()  # shuts the facade LLM down too


@pytest.fixture(scope="module")
def prompt(tiny_model):
    builder = RequestBuilder(tiny_model)
    return builder.build("Where and when did techno music originate?", 8).input_ids, builder.end_id


@pytest.fixture(scope="module")
def reference(llm, prompt):
    """Greedy tokens of the prompt from the CPU engine itself, with no end id (24 tokens)."""
    return llm.engine.generate(prompt[0], SamplingParams(max_tokens=24))


class Collector:
    def __init__(self) -> None:
        self.calls: list[tuple[list[int], bool]] = []
        self.errors: list[str] = []
        self.done = threading.Event()
        self.cancel = threading.Event()

    def emit(self, tokens, final):
        self.calls.append((list(tokens), final))
        if final:
            self.done.set()

    def fail(self, message):
        self.errors.append(message)
        self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [t for call, _ in self.calls for t in call]

    def request(self, prompt_ids, params, stream=False) -> GenerationRequest:
        return GenerationRequest(list(prompt_ids), params, self.emit, stream=stream, fail=self.fail,
                                 cancelled=self.cancel.is_set)


def run(engine, prompt_ids, params, stream=False) -> Collector:
    c = Collector()
    engine.submit(c.request(prompt_ids, params, stream))
    assert c.done.wait(WAIT_S), "no final response"
    return c


def test_greedy_whole_response_matches_the_cpu_engine(engine, prompt, reference):
    c = run(engine, prompt[0], SamplingParams(max_tokens=24))
    assert c.errors == [] and c.calls == [(reference, True)]


def test_streaming_emits_each_new_token_then_an_empty_final(engine, prompt, reference):
    c = run(engine, prompt[0], SamplingParams(max_tokens=24), stream=True)
    assert c.calls[-1] == ([], True)
    assert all(not final and len(tokens) >= 1 for tokens, final in c.calls[:-1])
    assert c.tokens == reference


def test_end_id_ends_the_sequence_and_is_not_returned(engine, prompt, reference):
    end = reference[5]
    c = run(engine, prompt[0], SamplingParams(max_tokens=24, end_id=end), stream=True)
    assert c.tokens == reference[:reference.index(end)]


def test_single_token_stop_word_ends_the_sequence_and_is_returned(engine, llm, prompt, reference):
    stop = reference[6]
    c = run(engine, prompt[0], SamplingParams(max_tokens=24, stop_words=[[stop]]))
    assert c.tokens == reference[:reference.index(stop) + 1]
    assert llm.submitted[-1].stop_token_ids == [stop]


def test_multi_token_stop_word_ends_the_sequence_is_returned_and_aborts_the_engine(engine, llm, prompt,
                                                                                    reference):
    word = reference[4:6]
    first = next(i for i in range(len(reference)) if reference[i:i + 2] == word)
    c = run(engine, prompt[0], SamplingParams(max_tokens=24, stop_words=[word]), stream=True)
    assert c.tokens == reference[:first + 2] and c.calls[-1] == ([], True)
    assert llm.results[-1].aborted()


def test_bad_words_redirect_generation(engine, prompt, reference):
    single = run(engine, prompt[0], SamplingParams(max_tokens=4, bad_words=[[reference[0]]])).tokens
    assert single[0] != reference[0]
    double = run(engine, prompt[0], SamplingParams(max_tokens=4, bad_words=[reference[:2]])).tokens
    assert double[0] == reference[0] and double[1] != reference[1]


def test_same_seed_same_sample_and_unseeded_requests_differ(engine, prompt):
    params = dict(max_tokens=16, temperature=1.5, top_k=50)
    seeded = [run(engine, prompt[0], SamplingParams(seed=7, **params)).tokens for _ in range(2)]
    assert seeded[0] == seeded[1]
    unseeded = [tuple(run(engine, prompt[0], SamplingParams(**params)).tokens) for _ in range(3)]
    assert len(set(unseeded)) > 1


def test_cancelled_request_is_aborted_in_the_engine_and_gets_nothing_more(engine, llm, prompt):
    c = Collector()
    engine.submit(c.request(prompt[0], SamplingParams(max_tokens=800), stream=True))
    deadline = threading.Event()
    for _ in range(WAIT_S * 10):
        if c.calls:
            break
        deadline.wait(0.1)
    assert c.calls and c.errors == []
    c.cancel.set()
    result = llm.results[-1]
    for _ in range(WAIT_S * 10):
        if result.aborted() and llm.engine.pending() == 0:
            break
        deadline.wait(0.1)
    assert result.aborted(), "abort() never reached the engine"
    received = len(c.calls)
    deadline.wait(0.5)
    assert len(c.calls) == received and not c.done.is_set() and c.errors == []
    assert result.engine_tokens < 800


def test_engine_error_fails_only_that_request(engine, prompt, reference):
    bad = Collector()
    engine.submit(bad.request(prompt[0], SamplingParams(max_tokens=5000)))  # beyond the 1024 positions
    good = run(engine, prompt[0], SamplingParams(max_tokens=24))
    assert bad.done.wait(WAIT_S)
    assert bad.calls == [] and "exceeds the model's 1024 positions" in bad.errors[0]
    assert good.tokens == reference


def test_refused_request_fails_with_the_reason(engine, llm, prompt):
    c = run(engine, [], SamplingParams(max_tokens=4))
    assert c.errors == ["input_ids is empty"]
    submitted = len(llm.submitted)
    c = run(engine, prompt[0], SamplingParams(max_tokens=4, temperature=float("inf"), top_k=5))
    assert c.errors and c.errors[0].startswith("temperature must be a finite number")
    assert len(llm.submitted) == submitted  # never reached the engine


def test_close_ends_running_requests_with_an_error_and_shuts_the_llm_down(tiny_model, prompt):
    facade = llmapi_facade.LLM(str(tiny_model), max_batch_size=2)
    eng = LLMAPIEngine(facade, llmapi_facade.SamplingParams)
    c = Collector()
    eng.submit(c.request(prompt[0], SamplingParams(max_tokens=800), stream=True))
    for _ in range(WAIT_S * 10):
        if c.calls:
            break
        c.done.wait(0.1)
    eng.close()
    assert c.errors == ["server is shutting down"] and facade.shut_down
    with pytest.raises(RuntimeError, match="closed"):
        eng.submit(c.request(prompt[0], SamplingParams(max_tokens=1)))


def test_a_tensorrt_engine_takes_single_token_bad_words_and_refuses_longer_ones(tiny_model, prompt, reference):
    llm = llmapi_facade.LLM(str(tiny_model), max_batch_size=2)
    eng = LLMAPIEngine(llm, llmapi_facade.SamplingParams, logits_processors=False)
    try:
        assert run(eng, prompt[0], SamplingParams(max_tokens=4, bad_words=[[reference[0]]])).tokens[0] != reference[0]
        assert llm.submitted[-1].bad_token_ids == [reference[0]]
        c = run(eng, prompt[0], SamplingParams(max_tokens=4, bad_words=[[1, 2]]))
        assert "bad_words" in c.errors[0] and "single-token" in c.errors[0]
    finally:
        eng.close()


# -- loading: layout, options, versions ----------------------------------------------------------------------
def _make_engine_output(tmp_path, fmt="llmapi", version=">=1.0", tp=2, options=None):
    out = tmp_path / "out"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / llmapi.ENGINE_INFO_FILE).write_text(json.dumps({"format": fmt, "tensorrt_llm": version, "tp_size": tp}))
    if options is not None:
        (out / llmapi.OPTIONS_FILE).write_text(options)
    return out


def test_layout_reads_the_options_file_as_llm_keyword_arguments(tmp_path):
    out = _make_engine_output(tmp_path, options="tensor_parallel_size: 2\nmax_batch_size: 64\n"
                                                "kv_cache_config:\n  free_gpu_memory_fraction: 0.85\n"
                                                "cuda_graph_config:\n  batch_sizes: [1, 2, 4]\n")
    layout = read_layout(out)
    assert layout.format == "llmapi" and layout.model == out and layout.tokenizer == out
    assert layout.options == {"tensor_parallel_size": 2, "max_batch_size": 64,
                              "kv_cache_config": {"free_gpu_memory_fraction": 0.85},
                              "cuda_graph_config": {"batch_sizes": [1, 2, 4]}}
    assert llm_kwargs(layout) == layout.options


def test_plain_checkpoint_loads_with_tp_from_steerlm_engine_json_or_defaults(tmp_path, tiny_model):
    assert read_layout(tiny_model).options == {}
    assert read_layout(_make_engine_output(tmp_path, tp=4)).options == {"tensor_parallel_size": 4}


def test_legacy_layout_loads_the_engine_subdirectory_with_engine_options_only(tmp_path):
    out = _make_engine_output(tmp_path, fmt="legacy-engine", version="==1.2.1",
                              options="tensor_parallel_size: 2\nmax_seq_len: 4096\ncuda_graph_config: {}\n")
    with pytest.raises(LLMAPIError, match="holds no TensorRT engine"):
        read_layout(out)
    (out / "engine").mkdir()
    (out / "engine" / "config.json").write_text(json.dumps({"version": "1.2.1"}))
    layout = read_layout(out)
    assert layout.model == out / "engine" and layout.tokenizer == out / "engine"  # the template sits by the engine
    assert llm_kwargs(layout) == {"tensor_parallel_size": 2}
    (out / "tokenizer.json").write_text("{}")
    assert read_layout(out).tokenizer == out


def test_unknown_format_is_named(tmp_path):
    with pytest.raises(LLMAPIError, match="format 'onnx' is not one of: llmapi, legacy-engine"):
        read_layout(_make_engine_output(tmp_path, fmt="onnx"))


def test_version_checks(tmp_path):
    out = _make_engine_output(tmp_path, fmt="legacy-engine", version="==1.2.1")
    (out / "engine").mkdir()
    (out / "engine" / "config.json").write_text(json.dumps({"version": "1.2.1"}))
    layout = read_layout(out)
    check_version(layout, "1.2.1")
    with pytest.raises(LLMAPIError, match="has no TensorRT backend"):
        check_version(layout, "1.3.0rc23")
    with pytest.raises(LLMAPIError, match="built by TensorRT-LLM 1.2.1"):
        check_version(layout, "1.2.0")
    with pytest.raises(LLMAPIError, match=r"needs TensorRT-LLM >=1.1"):
        check_version(read_layout(_make_engine_output(tmp_path / "b", version=">=1.1")), "1.0.0")
    with pytest.raises(LLMAPIError, match="needs TensorRT-LLM >= 1.0"):
        check_version(read_layout(_make_engine_output(tmp_path / "c", version="")), "0.21.0")
    with pytest.raises(LLMAPIError) as exc:
        check_version(layout, None)
    assert str(exc.value) == INSTALL_HINT


@pytest.mark.skipif(llmapi.installed_version() is not None, reason="TensorRT-LLM is installed here")
def test_without_tensorrt_llm_loading_says_what_to_install_in_one_line(tiny_model):
    with pytest.raises(LLMAPIError) as exc:
        load_llm(tiny_model)
    message = str(exc.value)
    assert "\n" not in message and "pip install" in message and "tensorrt-llm" in message
    assert "nvcr.io/nvidia/tritonserver" in message


# -- GPU ------------------------------------------------------------------------------------------------------
def _gpu_reason() -> str | None:
    if llmapi.installed_version() is None:
        return "needs TensorRT-LLM (pip install tensorrt-llm, or NVIDIA's Triton TRT-LLM container)"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return None


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
def test_tensorrt_llm_greedy_stream_equals_whole(tiny_model, prompt):
    eng = LLMAPIEngine.from_model_dir(tiny_model, {"max_batch_size": 4, "max_seq_len": 512,
                                                   "kv_cache_config": {"free_gpu_memory_fraction": 0.2}})
    try:
        whole = run(eng, prompt[0], SamplingParams(max_tokens=16, end_id=prompt[1]))
        streamed = run(eng, prompt[0], SamplingParams(max_tokens=16, end_id=prompt[1]), stream=True)
        assert whole.errors == [] and streamed.tokens == whole.tokens
        cpu = Engine(tiny_model)
        try:
            assert whole.tokens == cpu.generate(prompt[0], SamplingParams(max_tokens=16, end_id=prompt[1]))
        finally:
            cpu.close()
    finally:
        eng.close()


# -- the generator's request path over both engines ----------------------------------------------------------
class Sink:
    def __init__(self) -> None:
        self.responses: list[tuple[dict | None, bool, str | None]] = []
        self.done = threading.Event()

    def send(self, outputs, final, error=None):
        self.responses.append((None if outputs is None else {k: v.tolist() for k, v in outputs.items()}, final, error))
        if final:
            self.done.set()

    def is_cancelled(self):
        return False


def _answer(core, builder, key, question, **kwargs) -> list:
    sink = Sink()
    core.submit(*builder.build(question, 24, **kwargs).to_wire(key), sink)
    assert sink.done.wait(WAIT_S), "no final response"
    return sink.responses


def test_generator_answers_the_same_over_the_llmapi_engine_as_over_the_torch_engine(tiny_model, llm, engine):
    from steerlm.serve.generator import GeneratorCore
    from steerlm.spec import load_spec
    from steerlm.tokenize import load_tokenizer

    key = b"k" * 32
    builder = RequestBuilder(tiny_model)
    trailer = load_spec(tiny_model).template.answer_end
    torch_core = GeneratorCore(llm.engine, load_tokenizer(tiny_model), trailer, key)
    llmapi_core = GeneratorCore(engine, load_tokenizer(tiny_model), trailer, key)
    question = "Where and when did techno music originate?"
    whole = _answer(torch_core, builder, key, question)
    text = whole[-1][0]["text_output"][0][0].decode()
    stop = text.strip()[3:7]
    assert stop.strip(), f"no stop string to take from {text!r}"
    cases = {"whole": {}, "streamed": {"stream": True}, "stop string": {"stop_words": [stop], "stream": True},
             "sampled": {"sampling": {"temperature": 1.3, "top_k": 20, "seed": 3}}}
    answers = {}
    for name, kwargs in cases.items():
        answers[name] = _answer(llmapi_core, builder, key, question, **kwargs)
        assert answers[name] == _answer(torch_core, builder, key, question, **kwargs), name
    stopped = "".join(r[0]["text_output"][0][0].decode() for r in answers["stop string"] if r[0])
    assert stop not in stopped and text.startswith(stopped) and len(stopped) < len(text)
