"""Qwen2.5-VL's chat template with Qwen2.5-Instruct's tool sections (the Hermes tool format).

Qwen2.5-VL publishes a template without tools, but its language model is Qwen2.5, trained to read
function signatures in ``<tools>`` and answer with ``<tool_call>`` blocks laid out exactly as
Qwen2.5-Instruct's template renders them. This template is Qwen2.5-VL's (same default system text,
same vision tokens) with those sections added. ``PromptBuilder`` renders it only when a request has
tools or tool history, so every other prompt stays what the published template renders.

Every client string (text parts, tool signatures, call names and arguments) arrives here as an
opaque placeholder; the markup around them (``<tools>``, ``<tool_call>``, ``<tool_response>``) is
template text, so ``<tool_call>`` becomes its own token and client text cannot.
"""

from __future__ import annotations

import functools

from jinja2.sandbox import ImmutableSandboxedEnvironment

# messages: [{"role", "content": [{"type": "text", "text"} | {"type": "image"} | {"type": "video"}],
#             "tool_calls": [{"name",
# "arguments"}]}]; tools: one JSON text per tool ({"type": "function", "function": {...}}).
TOOLS_TEMPLATE = r"""
{%- macro render_content(message) -%}
    {%- for part in message.content -%}
        {%- if part.type == 'image' -%}
            {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
        {%- elif part.type == 'video' -%}
            {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
        {%- else -%}
            {{- part.text -}}
        {%- endif -%}
    {%- endfor -%}
{%- endmacro -%}
{%- if messages[0].role == 'system' -%}
    {{- '<|im_start|>system\n' + render_content(messages[0]) -}}
{%- else -%}
    {{- '<|im_start|>system\nYou are a helpful assistant.' -}}
{%- endif -%}
{%- if tools -%}
    {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + tool -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        '<args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in messages -%}
    {%- if loop.first and message.role == 'system' -%}
    {%- elif message.role == 'tool' -%}
        {#- Consecutive results share one user turn, one <tool_response> each. -#}
        {%- if loop.first or loop.previtem.role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + render_content(message) + '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- elif message.role == 'assistant' and message.tool_calls -%}
        {{- '<|im_start|>assistant' -}}
        {%- if message.content -%}
            {{- '\n' + render_content(message) -}}
        {%- endif -%}
        {%- for call in message.tool_calls -%}
            {{- '\n<tool_call>\n{"name": "' + call.name + '", "arguments": ' + call.arguments + '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- else -%}
        {{- '<|im_start|>' + message.role + '\n' + render_content(message) + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""


@functools.cache
def _compiled():
    return ImmutableSandboxedEnvironment().from_string(TOOLS_TEMPLATE)


def render_with_tools(messages: list[dict], tools: list[str], *, add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` (shaped as above) with ``tools`` offered to the model."""
    return _compiled().render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)
