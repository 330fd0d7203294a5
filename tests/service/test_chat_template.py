"""The gateway's torch-free chat rendering (dexserve.contract.chat) equals transformers'
apply_chat_template(add_generation_prompt=True), text and token ids, on checkpoints with a template."""

from __future__ import annotations

import json

import pytest

from dexserve.contract.chat import ChatTemplate, ChatTemplateError, Message
from dexserve.contract.model_card import ModelCard, ModelLoadError, shipped_model_dir

from tiny_models import CHATML_TEMPLATE, copy_checkpoint, with_chat_template

# Namespaces, tojson, loop filters and controls, upper, the generation tag, bos/eos tokens.
RICH_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}{%- if m.role == 'system' -%}{%- set ns.system = m.content -%}{%- endif -%}{%- endfor -%}"
    "{{ bos_token }}{% if ns.system %}<<SYS>>{{ ns.system | tojson }}<</SYS>>\n{% endif %}"
    "{% for m in messages if m.role != 'system' %}"
    "{% if loop.index0 > 5 %}{% break %}{% endif %}"
    "[{{ m.role | upper }}] {% generation %}{{ m.content }}{% endgeneration %}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "def add(a, b):"}],
    [{"role": "system", "content": "You write Python <b>\"quoted\"</b> ünïcode."},
     {"role": "user", "content": "  sort a list  "},
     {"role": "assistant", "content": "sorted(xs)"},
     {"role": "user", "content": "and reverse it"}],
]


@pytest.fixture(params=["chatml", "rich", "jinja-file"])
def checkpoint(request, tmp_path):
    path = copy_checkpoint(shipped_model_dir(), tmp_path / "chat-model")
    if request.param == "chatml":
        with_chat_template(path)
    elif request.param == "rich":
        with_chat_template(path, RICH_TEMPLATE)
    else:   # transformers 5 saves templates as chat_template.jinja, which wins over tokenizer_config.json
        with_chat_template(path, "{{ 'overridden' }}")
        (path / "chat_template.jinja").write_text(RICH_TEMPLATE)
    return path


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "system-and-turns"])
def test_rendering_equals_transformers_apply_chat_template(checkpoint, messages):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(checkpoint))
    want_text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    want_ids = list(want_ids["input_ids"] if hasattr(want_ids, "keys") else want_ids)
    card = ModelCard.load(checkpoint)
    text = card.chat_template().render([Message(m["role"], m["content"]) for m in messages])
    assert text == want_text
    assert card.prompt_tokenizer().encode(text) == want_ids   # what the engine runs (no special tokens added)


def test_special_tokens_reach_the_template(tmp_path):
    path = with_chat_template(copy_checkpoint(shipped_model_dir(), tmp_path / "m"), "{{ bos_token }}|{{ eos_token }}")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["bos_token"] = {"content": "<s>", "special": True}          # the AddedToken form
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert ModelCard.load(path).chat_template().render([Message("user", "x")]) == "<s>|<|endoftext|>"


def test_no_template_and_broken_templates(tmp_path):
    assert ModelCard.load(shipped_model_dir()).chat_template() is None
    broken = with_chat_template(copy_checkpoint(shipped_model_dir(), tmp_path / "broken"), "{% for m in messages %}")
    with pytest.raises(ModelLoadError, match="does not compile"):
        ModelCard.load(broken).chat_template()
    template = ChatTemplate(CHATML_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        template.render([Message("tool", "42")])
    with pytest.raises(ChatTemplateError, match="at least one message"):
        template.render([])
    sandbox = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        sandbox.render([Message("user", "x")])
