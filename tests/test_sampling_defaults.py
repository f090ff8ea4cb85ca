"""generation_config.json's sampling values fill what a request leaves out (vLLM's behaviour)."""

from glm4serve.api.schemas import ChatCompletionRequest, CompletionRequest
from glm4serve.model.tokenizer import Tokenizer

MSG = [{"role": "user", "content": "hi"}]


def test_tokenizer_reads_the_checkpoints_sampling_defaults(make_checkpoint):
    tok = Tokenizer.from_dir(make_checkpoint())
    assert tok.sampling_defaults == {"temperature": 0.8, "top_p": 0.8}  # as glm-4-9b-chat ships


def test_real_glm_4_9b_chat_defaults(real_chat_dir):
    assert Tokenizer.from_dir(real_chat_dir).sampling_defaults == {"temperature": 0.8, "top_p": 0.8}


def test_defaults_fill_only_what_the_request_leaves_out():
    defaults = {"temperature": 0.8, "top_p": 0.8, "top_k": 5, "repetition_penalty": 1.1}
    p = ChatCompletionRequest(model="m", messages=MSG).sampling_params(10, None, defaults)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.8, 0.8, 5, 1.1)
    sent = ChatCompletionRequest(model="m", messages=MSG, temperature=0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    p = sent.sampling_params(10, None, defaults)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.0, 1.0, 0, 1.0)
    p = CompletionRequest(model="m", prompt="x").sampling_params(10, None, defaults)
    assert (p.temperature, p.top_p) == (0.8, 0.8)


def test_without_defaults_openai_values_apply():
    p = ChatCompletionRequest(model="m", messages=MSG).sampling_params(10, None)
    assert (p.temperature, p.top_p) == (1.0, 1.0)
