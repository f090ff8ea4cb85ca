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


def test_generation_config_and_its_overrides_choose_the_defaults(tmp_path):
    """vLLM's --generation-config (auto: the checkpoint's; vllm: none; a folder's) and
    --override-generation-config over it, as the server applies them to a request that leaves them out."""
    import json

    import pytest
    from fastapi.testclient import TestClient
    from pydantic import ValidationError

    from glm4serve.api.settings import ServerSettings
    from tests.api_fakes import engine_of, make_app

    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 7, "max_length": 9}))

    def params(**settings):
        app = make_app(**settings)
        assert TestClient(app).post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 1}).status_code == 200
        p = engine_of(app).calls[-1].params
        return p.temperature, p.top_p, p.top_k

    checkpoint = {"temperature": 0.8, "top_p": 0.8}  # as glm-4-9b-chat ships them
    assert ServerSettings().sampling_defaults(checkpoint) == checkpoint
    assert ServerSettings(generation_config="vllm").sampling_defaults(checkpoint) == {}
    assert ServerSettings(generation_config=str(other)).sampling_defaults(checkpoint) == {"temperature": 0.3,
                                                                                          "top_k": 7}
    assert ServerSettings(override_generation_config='{"temperature": 0.6}').sampling_defaults(checkpoint) == {
        "temperature": 0.6, "top_p": 0.8}
    assert params(generation_config=str(other)) == (0.3, 1.0, 7)
    assert params(generation_config="vllm", override_generation_config={"top_p": 0.5}) == (1.0, 0.5, 0)
    for bad in ({"generation_config": str(tmp_path)}, {"override_generation_config": '{"max_new_tokens": 5}'},
                {"override_generation_config": '{"temperature": "hot"}'}, {"override_generation_config": "[1]"},
                {"override_generation_config": '{"temperature": -1}'}, {"override_generation_config": '{"top_p": 2}'},
                {"override_generation_config": '{"top_k": 2.5}'}):
        with pytest.raises(ValidationError):
            ServerSettings(**bad)
