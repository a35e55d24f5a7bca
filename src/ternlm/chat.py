"""Chat prompts: the model's jinja2 chat template, rendered in jinja2's sandbox, within limits.

A template comes with the model file, from whoever published it. The sandbox keeps it away from
Python's internals; the limits keep it from hanging or exhausting memory: a bounded number of
template steps (loops, macros), filter arguments (widths, counts) of at most MAX_FILTER_ARGUMENT,
`*` and `**` results and the rendered text of at most MAX_TEXT characters. Any failure while
rendering is a ValueError naming the problem.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import FormatError

# BitNet b1.58 2B4T: "Role: content<|eot_id|>" per message, BOS first, then "Assistant: ".
BITNET_2B4T_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
MAX_STEPS = 1_000_000  # template lines executed per render; a long conversation takes tens of thousands
MAX_TEXT = 1 << 22  # characters (or list items) a render or one operation may produce
MAX_FILTER_ARGUMENT = 100_000
MAX_POWER_BITS = 1 << 16


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _check_arguments(arguments, formats=()) -> None:
    """Refuses integer arguments above MAX_FILTER_ARGUMENT, and format strings (`formats`) with a
    width or precision of six digits: both are how one call makes gigabytes of text."""
    for argument in arguments:
        if isinstance(argument, int) and abs(argument) > MAX_FILTER_ARGUMENT:
            raise jinja2.exceptions.TemplateError(f"the argument {argument} is over {MAX_FILTER_ARGUMENT}")
    for text in formats:
        if isinstance(text, str) and re.search(r"\d{6}", text):
            raise jinja2.exceptions.TemplateError("format widths over 99999 are not allowed")


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with `*`, `**` and `%` refused when their result would be huge, and
    the arguments of filters and method calls capped (`center(10**9)`, `batch(10**9)`,
    `'%0999999999d'|format(1)`, `'{:>999999999}'.format(1)`)."""

    intercepted_binops = frozenset(["*", "**", "%"])

    def __init__(self, **options):
        super().__init__(**options)
        self.filters = {name: _capped(f, checks_value=name == "format") for name, f in self.filters.items()}

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(count, int) \
                        and len(sequence) * count > MAX_TEXT:
                    raise jinja2.exceptions.TemplateError(f"`*` would make {len(sequence) * count} items")
            return left * right
        if operator == "%":
            _check_arguments((), formats=[left])
            return left % right
        if isinstance(left, int) and isinstance(right, int) and right * max(left.bit_length(), 1) > MAX_POWER_BITS:
            raise jinja2.exceptions.TemplateError(f"`**` would make a number of {right * left.bit_length()} bits")
        return left ** right

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
        _check_arguments((*args, *kwargs.values()))
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value):
        """jinja2's hook for `str.format` and `str.format_map`, when the template looks them up."""
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_arguments((), formats=[value.__self__])
        return wrapped


def _capped(f, checks_value: bool):
    """`f` with _check_arguments on its arguments after the filtered value (and on the value, a
    format string, when `checks_value`)."""
    skip = 1 + (getattr(f, "jinja_pass_arg", None) is not None)  # the context or environment, then the value

    def capped(*args, **kwargs):
        _check_arguments((*args[skip:], *kwargs.values()), formats=args[skip - 1: skip] if checks_value else ())
        return f(*args, **kwargs)

    if hasattr(f, "jinja_pass_arg"):
        capped.jinja_pass_arg = f.jinja_pass_arg
    return capped


class _StepBudget:
    """A trace function that counts the lines the template's compiled code executes (jinja compiles
    a template from a string under the file name "<template>") and stops it past `steps`."""

    def __init__(self, steps: int):
        self.left = steps

    def calls(self, frame, event, arg):
        return self.lines if frame.f_code.co_filename == "<template>" else None

    def lines(self, frame, event, arg):
        if event == "line":
            self.left -= 1
            if self.left < 0:
                raise jinja2.exceptions.TemplateError(f"the template ran for over {MAX_STEPS} steps")
        return self.lines


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "", origin: str = "chat template"):
        self.source = source or BITNET_2B4T_TEMPLATE
        self.bos_token, self.eos_token = bos_token, eos_token
        env = _LimitedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except jinja2.exceptions.TemplateError as e:
            raise FormatError(origin, f"invalid chat template: {e}") from None
        except RecursionError:
            raise FormatError(origin, "invalid chat template: nested too deeply") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("each message must be a dict with string 'role' and 'content'")
        variables = dict(messages=messages, add_generation_prompt=add_generation_prompt,
                         bos_token=self.bos_token, eos_token=self.eos_token)
        budget, tracer = _StepBudget(MAX_STEPS), sys.gettrace()
        sys.settrace(budget.calls)
        try:
            pieces, length = [], 0
            for piece in self._template.generate(**variables):
                length += len(piece)
                if length > MAX_TEXT:
                    raise jinja2.exceptions.TemplateError(f"the rendered text is over {MAX_TEXT} characters")
                pieces.append(piece)
            return "".join(pieces)
        except Exception as e:  # the template's own errors and any its code runs into (1/0, "a" + 1, recursion)
            raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(tracer)


def usable_template(template: str | None, bos_token: str, eos_token: str, has_eot_token: bool) -> str | None:
    """The model's own template, unless it is a broken 2B4T one, as the official GGUF converter writes:
    a "Role: content" template that does not render 2B4T's format exactly (turns must end in
    <|eot_id|>, or the model talks on for both sides). None means the built-in 2B4T template."""
    if template is None or not has_eot_token:
        return template
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    try:
        text = ChatTemplate(template, bos_token, eos_token).render(messages)
    except (FormatError, ValueError):
        return template  # a template that does not render is reported when the model is loaded
    if "User: hi" in text and text != ChatTemplate(BITNET_2B4T_TEMPLATE, bos_token, eos_token).render(messages):
        return None
    return template
