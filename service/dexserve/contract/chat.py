"""Chat messages -> the prompt text, with the model's own chat template, without transformers.

The template is the checkpoint's: `chat_template.jinja` if present, else
`tokenizer_config.json`'s `chat_template` (a string, or named templates of which
`default` is used), the same precedence transformers uses. It is rendered the way
`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`
renders it: a sandboxed jinja2 environment with `trim_blocks` and `lstrip_blocks`,
the `loopcontrols` extension, a `tojson` that does not escape HTML, the
`raise_exception` and `strftime_now` globals, and the tokenizer's special tokens
(`bos_token`, `eos_token`, ...) as variables. The engine then encodes the text
without adding special tokens, as apply_chat_template(tokenize=True) does, so a
chat request runs exactly the tokens transformers would give the model
(tests/service/test_chat_template.py compares the two).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
# transformers' SPECIAL_TOKENS_ATTRIBUTES: what apply_chat_template passes to every template.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The messages could not be rendered (the template raised, or they are malformed)."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def _token_string(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick(template) -> str | None:
    """A template entry: a string, {"name": template}, or [{"name", "template"}]; `default` of several."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        chosen = template.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(source)

    @classmethod
    def from_dir(cls, path: Path) -> "ChatTemplate | None":
        """The checkpoint's template, or None when it has none."""
        config: dict = {}
        cfg_path = path / TOKENIZER_CONFIG
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as exc:
                raise ChatTemplateError(f"{cfg_path} is not valid JSON: {exc}") from exc
        source = None
        if (path / CHAT_TEMPLATE_FILE).is_file():
            source = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        elif config.get("chat_template") is not None:
            source = _pick(config["chat_template"])
        if not source:
            return None
        special = {k: v for k in SPECIAL_TOKENS if (v := _token_string(config.get(k))) is not None}
        return cls(source, special)

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        import jinja2

        if not messages:
            raise ChatTemplateError("must hold at least one message")
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template refused them: {exc}") from exc


def _compile(source: str):
    """The template compiled in the environment transformers builds (chat_template_utils)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateNamespace(jinja2.utils.Namespace):
        """Namespaces refuse underscore-prefixed attributes (no reaching into CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers some templates carry):
        renders its body, as transformers does when it is not computing a mask."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = lambda *a, **kw: dict(*a, **kw)
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc
