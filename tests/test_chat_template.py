"""GLM-4 prompt rendering: the exact glm-4-9b-chat format, built-in vs the checkpoint's template."""

import datetime
import json

import pytest

from glm4serve.chat.template import (
    TemplateError,
    builtin_template,
    render_prompt,
    render_prompt_ids,
    template_reads_message_tools,
    to_glm_turns,
)

from shared_models import GLM4_CHAT_DIR as MODEL_DIR

# GLM-4's split pattern (GLM4.md section 4), typed here independently of the tokenizer module.
GLM4_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "城市名"}},
            "required": ["city"],
        },
    },
}

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What's the weather in 北京?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22, "condition": "晴"}'},
    {"role": "user", "content": "Should I take an umbrella?"},
]

# Written by hand from GLM4.md section 5: tool system turn first (no blank line between the
# heading and "## name"), the function object as indent-4 JSON with Chinese kept, then
# `<|role|>{metadata}\n{content}` turns with no end-of-turn token, then `<|assistant|>`.
EXPECTED_CONVERSATION_PROMPT = (
    "[gMASK]<sop><|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n"
    "\n"
    "# 可用工具\n"
    "## get_weather\n"
    "\n"
    "{\n"
    '    "name": "get_weather",\n'
    '    "description": "Get the current weather for a city",\n'
    '    "parameters": {\n'
    '        "type": "object",\n'
    '        "properties": {\n'
    '            "city": {\n'
    '                "type": "string",\n'
    '                "description": "城市名"\n'
    "            }\n"
    "        },\n"
    '        "required": [\n'
    '            "city"\n'
    "        ]\n"
    "    }\n"
    "}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "<|system|>\nAnswer briefly."
    "<|user|>\nWhat's the weather in 北京?"
    '<|assistant|>get_weather\n{"city": "北京"}'
    '<|observation|>\n{"temperature": 22, "condition": "晴"}'
    "<|user|>\nShould I take an umbrella?"
    "<|assistant|>"
)


@pytest.fixture(scope="module")
def real_template() -> str:
    if not MODEL_DIR.is_dir():
        pytest.skip(f"{MODEL_DIR} not present")
    return json.loads((MODEL_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]


@pytest.fixture(scope="module")
def tiktoken_encoding():
    if not MODEL_DIR.is_dir():
        pytest.skip(f"{MODEL_DIR} not present")
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(MODEL_DIR / "tokenizer.model"))
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = {tok["content"]: int(i) for i, tok in config["added_tokens_decoder"].items()}
    return tiktoken.Encoding(name="glm4-test", pat_str=GLM4_PAT, mergeable_ranks=ranks, special_tokens=specials)


# --- the exact format ---


def test_builtin_renders_the_hand_written_prompt():
    assert render_prompt(CONVERSATION, tools=[WEATHER_TOOL]) == EXPECTED_CONVERSATION_PROMPT


def test_real_template_renders_the_hand_written_prompt(real_template):
    got = render_prompt(CONVERSATION, tools=[WEATHER_TOOL], chat_template=real_template)
    assert got == EXPECTED_CONVERSATION_PROMPT


def test_check_value_ids_with_tiktoken(tiktoken_encoding, real_template):
    messages = [{"role": "user", "content": "hi"}]
    for template in (None, real_template):
        prompt = render_prompt(messages, chat_template=template)
        assert prompt == "[gMASK]<sop><|user|>\nhi<|assistant|>"
        # GLM4.md's check value
        assert tiktoken_encoding.encode(prompt, allowed_special="all") == [151331, 151333, 151336, 198, 6023, 151337]


def test_render_prompt_ids_with_project_tokenizer(tiktoken_encoding):
    tokenizer_module = pytest.importorskip("glm4serve.model.tokenizer")
    tokenizer = tokenizer_module.Tokenizer.from_dir(MODEL_DIR)
    ids = render_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])
    assert ids == [151331, 151333, 151336, 198, 6023, 151337]
    ids = render_prompt_ids(tokenizer, CONVERSATION, tools=[WEATHER_TOOL])
    assert ids == tiktoken_encoding.encode(EXPECTED_CONVERSATION_PROMPT, allowed_special="all")
    assert ids.count(151335) == 2 and ids.count(151338) == 1  # two system turns, one observation


# --- built-in template == the checkpoint's template, byte for byte ---

SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "在文档中搜索 <tags> & \"quotes\"",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {
                    "type": "object",
                    "properties": {"lang": {"type": "string", "enum": ["zh", "en"]}, "limit": {"type": "integer"}},
                },
            },
            "required": ["query"],
        },
    },
}

CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Hello!"}],
    "chinese_multi_turn": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "你好，请介绍一下长城。"},
        {"role": "assistant", "content": "长城是中国古代的军事防御工程。\n它很长。"},
        {"role": "user", "content": "谢谢！再说说故宫？"},
    ],
    "tools_no_system": [{"role": "user", "content": "找一下关于 GLM-4 的文档"}],
    "two_calls_and_results": [
        {"role": "user", "content": "Weather in Paris and 上海, and search docs"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "b", "type": "function", "function": {"name": "search_docs", "arguments": {"query": "上海"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "name": "get_weather", "content": "18C"},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "no results"}]},
        {"role": "assistant", "content": "Paris is 18C."},
        {"role": "user", "content": ""},  # empty turns are skipped by the format
    ],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_matches_real_template(real_template, name, with_tools, add_generation_prompt):
    tools = [WEATHER_TOOL, SEARCH_TOOL] if with_tools else None
    kwargs = dict(tools=tools, add_generation_prompt=add_generation_prompt)
    ours = render_prompt(CONVERSATIONS[name], **kwargs)
    theirs = render_prompt(CONVERSATIONS[name], chat_template=real_template, **kwargs)
    assert ours == theirs
    assert ours.startswith("[gMASK]<sop>")
    assert ours.endswith("<|assistant|>") == add_generation_prompt
    assert ("# 可用工具" in ours) == with_tools


def test_our_jinja_setup_matches_transformers(real_template):
    """Rendering the real template with transformers' own renderer gives the same text, so our
    environment (trim_blocks, lstrip_blocks, tojson) is set up as transformers sets it up."""
    from transformers.utils.chat_template_utils import render_jinja_template

    for messages in CONVERSATIONS.values():
        tools = [WEATHER_TOOL, SEARCH_TOOL]
        turns = [{"role": "system", "content": "", "tools": tools}] + to_glm_turns(messages)
        rendered, _ = render_jinja_template([turns], chat_template=real_template, add_generation_prompt=True)
        assert render_prompt(messages, tools=tools, chat_template=real_template) == rendered[0]


# --- message conversion ---


def test_text_parts_equal_string_content():
    as_string = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "你好"}]
    as_parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be nice."}]},
        {"role": "user", "content": [{"type": "text", "text": "你好"}]},
    ]
    assert render_prompt(as_parts) == render_prompt(as_string)
    two_parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_prompt(two_parts) == render_prompt([{"role": "user", "content": "a\nb"}])


def test_tool_calls_become_one_turn_each_after_the_text():
    turns = to_glm_turns(CONVERSATIONS["two_calls_and_results"])
    assert [(t["role"], t["metadata"], t["content"]) for t in turns[1:6]] == [
        ("assistant", "", "Let me check."),
        ("assistant", "get_weather", '{"city": "Paris"}'),
        ("assistant", "search_docs", '{"query": "上海"}'),  # object arguments serialized, Chinese kept
        ("observation", "", "18C"),
        ("observation", "", "no results"),
    ]


def test_a_call_without_arguments_is_glm4s_empty_object_not_a_missing_turn():
    for arguments in (None, ""):
        [_, call] = to_glm_turns([{"role": "user", "content": "now?"}, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_time", "arguments": arguments}}]}])
        assert (call["role"], call["metadata"], call["content"]) == ("assistant", "get_time", "{}")


def test_role_aliases():
    turns = to_glm_turns(
        [{"role": "developer", "content": "d"}, {"role": "function", "name": "f", "content": "r"},
         {"role": "observation", "content": "o"}]
    )
    assert [t["role"] for t in turns] == ["system", "observation", "observation"]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "wizard", "content": "hi"}],
        [{"content": "no role"}],
        ["not a dict"],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
        [{"role": "user", "content": 42}],
        [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}],
        [{"role": ["user"], "content": "x"}],
        [{"role": "assistant", "content": "x", "tool_calls": 5}],
    ],
)
def test_unrenderable_messages_raise_template_error(messages):
    with pytest.raises(TemplateError) as info:
        render_prompt(messages)
    assert isinstance(info.value, ValueError)
    assert "messages[0]" in str(info.value)


# --- tools: handed to each template the way it wants them ---

# A 0414-style template (tools from the standard `tools` variable, `<|assistant|>\n` before plain
# replies), written for this test.
TEMPLATE_0414_STYLE = (
    "[gMASK]<sop>"
    "{%- if tools -%}<|system|>\n# 可用工具\n{% for tool in tools %}"
    "{%- set function = tool.function if tool.get('function') else tool %}\n## {{ function.name }}\n\n"
    "{{ function | tojson(indent=4, ensure_ascii=False) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{%- endfor %}{%- endif -%}"
    "{%- for msg in messages %}<|{{ msg.role }}|>{{ msg.get('metadata', '') }}\n{{ msg.content }}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_tools_detection(real_template):
    assert template_reads_message_tools(real_template)
    assert not template_reads_message_tools(builtin_template())
    assert not template_reads_message_tools(TEMPLATE_0414_STYLE)


def test_0414_style_template_gets_tools_argument_and_no_extra_system_turn():
    prompt = render_prompt([{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL], chat_template=TEMPLATE_0414_STYLE)
    assert prompt.count("## get_weather") == 1
    assert prompt.count("<|system|>") == 1  # only the tool turn: nothing injected into messages
    assert prompt.endswith("<|user|>\nhi<|assistant|>\n")


def test_empty_tools_list_means_no_tools(real_template):
    plain = render_prompt(CONVERSATIONS["plain"], chat_template=real_template)
    assert render_prompt(CONVERSATIONS["plain"], tools=[], chat_template=real_template) == plain
    assert "<|system|>" not in plain


def test_builtin_rejects_non_function_tools():
    with pytest.raises(TemplateError, match="only function tools"):
        render_prompt(CONVERSATIONS["plain"], tools=[{"type": "python"}])


# --- the jinja environment ---


def test_tojson_keeps_unicode_and_does_not_html_escape():
    template = "{{ x | tojson }}|{{ x | tojson(indent=2) }}"
    x = {"a": "<b>&'中'"}
    got = render_prompt([], chat_template=template, template_kwargs={"x": x})
    assert got == '{"a": "<b>&\'中\'"}|{\n  "a": "<b>&\'中\'"\n}'


def test_trim_and_lstrip_blocks():
    template = "A\n  {% if true %}\nB\n  {% endif %}\nC"
    assert render_prompt([], chat_template=template) == "A\nB\nC"


def test_strftime_now_and_template_kwargs():
    before = datetime.datetime.now().strftime("%Y")
    got = render_prompt([], chat_template="{{ strftime_now('%Y') }}-{{ flavour }}", template_kwargs={"flavour": "x"})
    after = datetime.datetime.now().strftime("%Y")
    assert got in (f"{before}-x", f"{after}-x")


def test_template_failures_raise_template_error():
    with pytest.raises(TemplateError, match="no system"):
        render_prompt([], chat_template="{{ raise_exception('no system') }}")
    with pytest.raises(TemplateError):
        render_prompt([], chat_template="{% if %}")  # syntax error
    with pytest.raises(TemplateError):
        render_prompt([], chat_template="{{ ''.__class__.__mro__ }}")  # sandbox
    with pytest.raises(TemplateError):
        render_prompt([], chat_template="{{ messages.append(1) }}")  # immutable sandbox
    with pytest.raises(TemplateError, match="messages"):
        render_prompt([], template_kwargs={"messages": []})


def test_generation_tag_parses():
    template = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    assert render_prompt([{"role": "assistant", "content": "ok"}], chat_template=template) == "ok"


# A template that closes every turn, as many do: continue_final_message must cut that end off.
CLOSING_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}<|end|>{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("reply", ["The weather in 北京 is", "Sure.  ", "  indented"])
def test_continue_final_message_cuts_where_transformers_cuts(real_template, reply):
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    for template in (real_template, builtin_template(), CLOSING_TEMPLATE):
        theirs, _ = render_jinja_template([to_glm_turns(messages)], chat_template=template,
                                          add_generation_prompt=False, continue_final_message=True)
        ours = render_prompt(messages, chat_template=template, add_generation_prompt=False,
                             continue_final_message=True)
        assert ours == theirs[0]
    ours = render_prompt(messages, add_generation_prompt=False, continue_final_message=True)
    assert ours.endswith("<|assistant|>\n" + reply)  # the built-in GLM-4 format keeps the text as it is
    with pytest.raises(TemplateError, match="continue"):
        render_prompt(messages[:1] + [{"role": "assistant", "content": " "}], continue_final_message=True)


def test_continue_final_message_goes_on_with_the_text_not_the_calls_after_it():
    """transformers cuts after the final message's text; its tool calls (rendered after it here) go."""
    call = {"id": "1", "type": "function", "function": {"name": "get_w", "arguments": '{"city": "Paris"}'}}
    for content in ("Paris", "get"):  # "get" also lies inside the call's name
        messages = [{"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": content, "tool_calls": [call]}]
        ours = render_prompt(messages, add_generation_prompt=False, continue_final_message=True)
        assert ours.endswith("<|user|>\nweather?<|assistant|>\n" + content)
