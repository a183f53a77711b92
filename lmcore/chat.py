"""Chat templates: a model's own conversation format (Hugging Face's Jinja convention), rendered and encoded.

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three primary colors."}]
    ids = prompt_ids(tok, msgs)                   # the conversation, then the template's "<|im_start|>assistant\\n"
    text = "".join(stream_text(model, tok, ids, 64, stop_ids=stop_tokens(tok)))   # the reply, up to "<|im_end|>"
    ids, prompt_len = example_ids(tok, msgs, "Red, yellow and blue.")   # training: prompt, answer, "<|im_end|>"
    render(tok.chat_template, msgs, add_generation_prompt=True, eos_token="<|im_end|>")   # the text alone

The template (a tokenizer's `chat_template`, e.g. SmolLM2's ChatML from its GGUF metadata) runs as transformers'
`apply_chat_template` runs it: a sandboxed Jinja environment (ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loop controls) with `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, and the
variables messages, add_generation_prompt, bos_token, eos_token, tools=None and documents=None. The ids are those
of `apply_chat_template(messages, tokenize=True)`, with one difference: a special token's text inside a message
("<|im_end|>" typed by a client or present in the data) stays ordinary text, as with transformers'
`sanitize_control_tokens=True`, so a message can neither end its turn early nor forge another. Only the template's
own special tokens are tokens.

The end of an assistant turn is learnt from the template itself: it renders a conversation that ends with a sentinel
assistant message, and the first special token after the sentinel is the end-of-turn ("<|im_end|>" for ChatML).
Training examples end with it (the model learns to stop), and generation stops at it.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmcore.errors import InputError

Message = dict[str, Any]  # {"role": "system" | "user" | "assistant", "content": str}

# Private-use characters around a special token's text inside a message: that text is encoded as ordinary text.
_START, _END = "\U000f0000", "\U000f0001"
_MARKED = re.compile(f"{_START}([^{_START}{_END}]*){_END}|[{_START}{_END}]")  # a marked token, or a lone marker
# The assistant message whose surroundings show where the template ends a turn.
_SENTINEL = "\U000f0002lmcore-end-of-turn-probe\U000f0002"


class ChatTemplateError(InputError):
    """A chat template that cannot be used (no template, a syntax error, or one the template raised itself)."""


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' marker of assistant text: renders its body as it is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace(), refusing underscore names: a template may not store what the sandbox would not read."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Namespace's own signature trick: namespace(self=...)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set the namespace attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which a prompt must not see.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"chat template: Jinja syntax error at line {err.lineno}: {err.message}") from None


def render(template: str, messages: list[Message], *, add_generation_prompt: bool, bos_token: str | None = None,
           eos_token: str | None = None) -> str:
    """The conversation as the template writes it (text; special tokens spelled out).

    Args:
        template: a Jinja chat template (Hugging Face's convention).
        messages: {"role", "content"} dicts; keys whose value is None are left out, as transformers does.
        add_generation_prompt: end with the template's start of an assistant turn ("<|im_start|>assistant\\n").
        bos_token, eos_token: the tokenizer's special tokens as text, visible to the template; None: undefined.

    Returns: the rendered text.
    Raises: ChatTemplateError for a syntax error, a `raise_exception` of the template (e.g. roles out of order) or
        an expression of it that fails on these messages.
    """
    specials = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return _compile(template).render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **specials)
    except jinja2.exceptions.SecurityError as err:
        raise ChatTemplateError(f"chat template: refused by the sandbox: {err}") from None
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template: {err}") from None
    except (TypeError, ValueError, LookupError, ArithmeticError) as err:  # the template's own expressions failed
        raise ChatTemplateError(f"chat template: {type(err).__name__}: {err}") from None


def _template_of(tok) -> str:
    template = getattr(tok, "chat_template", None)
    if not template:
        raise ChatTemplateError(f"the tokenizer {tok.name} has no chat template (use the alpaca or phi3 prompt template)")
    return template


def _special_texts(tok) -> dict[str, str | None]:
    """bos_token and eos_token as the template sees them: the tokens' text, or None."""
    ids = {"bos_token": getattr(tok, "bos_token", None), "eos_token": getattr(tok, "eos_token", None)}
    return {k: (tok.decode([t]) if t is not None else None) for k, t in ids.items()}


def _is_special(tok, token: int) -> bool:
    """A token that ordinary text never becomes: its own text, encoded as ordinary text, is other tokens."""
    try:
        text = tok.decode_single_token_bytes(token).decode("utf-8")
    except UnicodeDecodeError:  # a piece of a character: an ordinary byte-level token
        return False
    return tok.encode_ordinary(text) != [token]


def _mark(tok, text: str) -> str:
    """`text` with every special token spelled in it wrapped in the markers (markers already in it dropped)."""
    text = text.replace(_START, "").replace(_END, "")
    found = set(tok.encode(text)) - set(tok.encode_ordinary(text))
    specials = sorted({tok.decode([t]) for t in found if _is_special(tok, t)}, key=len, reverse=True)
    if not specials:
        return text
    pattern = re.compile("|".join(map(re.escape, specials)))
    return pattern.sub(lambda m: f"{_START}{m.group()}{_END}", text)


def _marked_messages(tok, messages: list[Message]) -> list[Message]:
    return [{**m, "content": _mark(tok, m["content"])} if isinstance(m.get("content"), str) else dict(m) for m in messages]


def _encode_rendered(tok, text: str) -> list[int]:
    """Ids of a rendered conversation: marked special tokens as ordinary text, the template's own as tokens."""
    if _START not in text and _END not in text:
        return tok.encode(text)
    # [text, marked token, text, ...], None for a lone marker (a template that split a marked token): it still
    # breaks the text, so the two sides cannot join into a special token.
    pieces = _MARKED.split(text)
    ids = tok.encode(pieces[0])
    newline = tok.encode("\n")
    for i, piece in enumerate(pieces[1:], start=1):
        if not piece:
            continue
        encode = tok.encode_ordinary if i % 2 == 1 else tok.encode
        # After a newline, so a SentencePiece tokenizer adds no prefix space in mid-text; then without it.
        piece_ids = encode("\n" + piece)
        ids += piece_ids[len(newline):] if piece_ids[: len(newline)] == newline else encode(piece)
    return ids


def prompt_ids(tok, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    """The token ids of a conversation in the tokenizer's chat template.

    Args:
        tok: a lmcore Tokenizer with a chat_template.
        messages: {"role", "content"} dicts, system messages included; the template decides what to make of them
            (SmolLM2's adds its default system prompt when there is none).
        add_generation_prompt: end with the start of an assistant turn, where the reply follows.

    Returns: the ids (as transformers' apply_chat_template(..., tokenize=True, sanitize_control_tokens=True)).
    Raises: ChatTemplateError when the tokenizer has no template or the template refuses the messages.
    """
    text = render(_template_of(tok), _marked_messages(tok, messages), add_generation_prompt=add_generation_prompt,
                  **_special_texts(tok))
    return _encode_rendered(tok, text)


_turn_ends: dict[tuple, tuple[list[int], int | None]] = {}  # (tokenizer, template) -> _turn_end


def _turn_end(tok) -> tuple[list[int], int | None]:
    """The ids the template writes after an assistant message up to its end-of-turn token, and that token.

    Without a special token after the message: all the text after it, then the end-of-text token, and None.
    """
    template, specials = _template_of(tok), _special_texts(tok)
    key = (tok.sha256, tok.eot_token, template, tuple(specials.items()))
    if key in _turn_ends:
        return _turn_ends[key]
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
    text = render(template, probe, add_generation_prompt=False, **specials)
    if _SENTINEL not in text:
        raise ChatTemplateError("the chat template leaves out the assistant's message; it cannot be trained on")
    after = tok.encode(text.split(_SENTINEL, 1)[1])
    end = next((i for i, t in enumerate(after) if _is_special(tok, t)), None)
    found = (after[: end + 1], after[end]) if end is not None else ([*after, tok.eot_token], None)
    _turn_ends[key] = found
    return found


def end_of_turn(tok) -> int | None:
    """The special token that ends an assistant turn in the tokenizer's chat template ("<|im_end|>" for ChatML),
    or None when the template ends a turn with ordinary text only."""
    return _turn_end(tok)[1]


def stop_tokens(tok) -> list[int]:
    """Every id that ends a reply: the tokenizer's stop tokens and the template's end of turn."""
    return list(dict.fromkeys([*tok.stop_tokens, *[t for t in [end_of_turn(tok)] if t is not None]]))


def example_ids(tok, messages: list[Message], answer: str) -> tuple[list[int], int]:
    """A training example: the prompt (with the generation prompt), the answer, the template's end of turn.

    Args:
        messages: the conversation before the answer (e.g. one user message).
        answer: the assistant's reply; ordinary text (a special token's text in it is not that token).

    Returns: (ids, prompt_len): ids end with the end-of-turn token (or, for a template without one, with the text
    after the answer and the end-of-text token); the first prompt_len ids are the prompt.
    """
    prompt = prompt_ids(tok, messages, add_generation_prompt=True)
    end, _ = _turn_end(tok)
    return prompt + tok.encode_ordinary(answer) + end, len(prompt)
