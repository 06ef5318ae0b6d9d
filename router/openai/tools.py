"""Chat tool calling for any model: the tools described in a system message, the answer held to a JSON
envelope by a grammar (engine/structured.py), and the envelope read back into OpenAI's tool_calls.

The model answers one JSON object, never free text around it:
    {"tool_calls": [{"name": <a tool's name>, "arguments": <an object its parameters schema allows>}, ...]}
    {"content": <a reply to the user>}                      (tool_choice "auto" only)
tool_choice "auto" allows either, "required" only tool_calls, a named function only a call of that function,
"none" neither (no tools, no grammar: free text). parallel_tool_calls false allows one call at most.
Earlier turns go back to the model in the same envelope: an assistant message's tool_calls as their JSON,
a tool message as its result text (role "tool"). llama.cpp's generic tool format works the same way: it needs
no tool-call parser for the model, and the grammar makes every call parse, at the cost of the model's own
trained tool format where it has one. Pure Python: no HTTP here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from pdcluster.router.openai.tool_stream import AnswerReader

MAX_TOOLS = 128                 # OpenAI's limit on tools per request

INSTRUCTIONS = {
    "auto": "You may call functions. To call one or more, answer with only a JSON object "
            '{"tool_calls": [{"name": <function name>, "arguments": <arguments object>}]}. '
            'To reply to the user instead, answer with only {"content": <your reply>}.',
    "required": "Call one or more of these functions: answer with only a JSON object "
                '{"tool_calls": [{"name": <function name>, "arguments": <arguments object>}]}.',
}


class ToolError(ValueError):
    """A request whose tools, tool_choice or tool messages cannot be served; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict                # a JSON schema of the arguments object


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools ask of the prompt, the grammar and the response."""
    functions: tuple[Function, ...]     # the ones the model may call
    choice: str                         # "auto" | "required" | "named"
    parallel: bool
    listed: tuple[Function, ...]        # every tool of the request, as the system message describes them

    def system_text(self) -> str:
        """The system message's addition: how to answer, then every tool as name, description, parameters."""
        intro = INSTRUCTIONS["auto" if self.choice == "auto" else "required"]
        if self.choice == "named":
            intro += f" Call {self.functions[0].name}."
        if not self.parallel:
            intro += " Make at most one call."
        listed = [{"name": f.name, "description": f.description, "parameters": f.parameters} if f.description
                  else {"name": f.name, "parameters": f.parameters} for f in self.listed]
        return f"{intro}\nFunctions:\n{json.dumps(listed, ensure_ascii=False)}"

    def schema(self) -> dict:
        """The JSON schema the answer is held to."""
        call = [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                 "required": ["name", "arguments"], "additionalProperties": False} for f in self.functions]
        calls = {"type": "array", "items": call[0] if len(call) == 1 else {"anyOf": call}, "minItems": 1}
        if not self.parallel or self.choice == "named":
            calls["maxItems"] = 1
        envelope = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                    "additionalProperties": False}
        if self.choice != "auto":
            return envelope
        reply = {"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"],
                 "additionalProperties": False}
        return {"anyOf": [envelope, reply]}


def functions_of(tools: list) -> tuple[Function, ...]:
    """The request's tools (schemas.Tool) as Functions; names unique, parameters an object schema."""
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"tools holds {len(tools)} tools; at most {MAX_TOOLS}", "tools")
    out, seen = [], set()
    for t in tools:
        f = t.function
        if f.name in seen:
            raise ToolError(f"tools names function {f.name!r} twice", "tools")
        seen.add(f.name)
        params = f.parameters if f.parameters is not None else {"type": "object", "properties": {}}
        if params.get("type", "object") != "object":
            raise ToolError(f"tools: function {f.name!r} parameters must be an object schema", "tools")
        out.append(Function(f.name, f.description, params))
    return tuple(out)


def plan(tools: list | None, tool_choice, parallel: bool) -> ToolPlan | None:
    """None where the model answers free text (no tools, or tool_choice "none")."""
    if not tools:
        if tool_choice is not None and tool_choice != "none":
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    functions = functions_of(tools)
    if tool_choice == "none":
        return None
    if tool_choice is None or isinstance(tool_choice, str):
        return ToolPlan(functions, tool_choice or "auto", parallel, functions)
    named = next((f for f in functions if f.name == tool_choice.function.name), None)
    if named is None:
        raise ToolError(f"tool_choice names function {tool_choice.function.name!r}, which is not in tools",
                        "tool_choice")
    return ToolPlan((named,), "named", False, functions)


def history_text(message) -> str:
    """An assistant message's tool_calls as the envelope the model answers with (its text content first)."""
    calls = []
    for c in message.tool_calls:
        try:
            args = json.loads(c.function.arguments)
        except (ValueError, RecursionError):        # (nested past the parser's depth: not JSON we take either)
            raise ToolError(f"messages: tool call {c.id!r} arguments are not JSON", "messages") from None
        calls.append({"name": c.function.name, "arguments": args})
    text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
    content = message.text()
    return f"{content}\n{text}" if content else text


@dataclass
class Answer:
    """A finished choice's message: content or tool calls, and the finish reason OpenAI gives it."""
    content: str | None
    tool_calls: list[dict] | None
    finish_reason: str | None


def read_answer(text: str, finish_reason: str | None) -> Answer:
    """The model's envelope -> OpenAI's message fields (router/openai/tool_stream.py reads it, as it reads a
    streamed one). An answer cut short (length, abort) gives what a stream of it gave: the calls read so far (the
    last one's arguments cut; finish_reason says so) or the reply so far, as OpenAI returns a cut call. (It came
    back as raw envelope text, as vLLM returns an unparsed answer, while its stream had sent the calls.) Text
    that is no envelope comes back as it is."""
    r = AnswerReader()
    r.feed(text)
    if r.state == "raw" or (r.state == "done" and r.pos != len(text)):     # not an envelope
        return Answer(text, None, finish_reason)
    if r.calls:
        return Answer(None, r.calls, "tool_calls" if finish_reason == "stop" and r.state == "done" else finish_reason)
    return Answer(r.content, None, finish_reason)
