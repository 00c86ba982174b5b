"""Model adapters: one streaming interface over the built-in simulation and real upstreams.

A model turns a conversation (messages plus tool specs) into a stream of chunks: text deltas,
tool-call deltas, and one finish. Two adapters:

* :class:`SimulatedModel` — a deterministic **simulation** of an LLM (no network, no weights),
  the default for the demo agent and for benchmarks. Text is sentences of a short built-in text
  about tether, picked by a seed, at a configurable time-to-first-token and tokens/s; tool calls
  come from a script.
* :class:`OpenAIChatModel` — OpenAI-compatible Chat Completions with streaming and tools
  (OpenAI, vLLM, Ollama, llama.cpp's server), over httpx.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import orjson


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as models produce it


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # system | user | assistant | tool
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str  # stop | tool_calls | length | error
    usage: dict[str, int] = field(default_factory=dict)


Chunk = TextDelta | ToolCallDelta | Finish


class Model(Protocol):
    name: str

    def stream(self, messages: Sequence[Message], tools: Sequence[ToolSpec]
               ) -> AsyncIterator[Chunk]: ...


class ModelError(Exception):
    """The upstream failed (HTTP error, malformed stream)."""


# --- the simulation ---------------------------------------------------------------------------

# What the simulated model says: real sentences about tether, grouped in paragraphs, and short
# closing sentences that make an answer exactly as long as asked (see ``SimulatedModel.answer``).
# It never pretends to understand.
SIMULATED_TEXT: tuple[str, ...] = (
    "This is a simulated answer. The demo agent runs on a stand-in model that does not read "
    "your message. Its sentences come from a short built-in text about tether, and the same "
    "conversation always gets the same answer. Connect a real model through any "
    "OpenAI-compatible server to get real answers.",
    "Every session in tether is a durable log of events, kept in order on the server. "
    "Messages, streamed answers, tool calls and approvals are all events in that log. Every "
    "tab, device and person that opens the session reads the same log, so they all see the "
    "same conversation.",
    "A client remembers the cursor of the last event it received. When the connection drops, "
    "it reconnects with backoff and resumes right after that cursor. Nothing is shown twice, "
    "even in the middle of a streamed answer. A refresh works the same way: the page restores "
    "what it showed and asks only for what came after. If the server cannot resume a cursor, "
    "the client says so and rebuilds the conversation from a snapshot.",
    "An answer streams into the log one token at a time while the agent keeps working on the "
    "server. Closing the laptop does not stop the run, and the answer is complete when you "
    "come back. Anyone in the session can press **Stop**, which cancels the run for everyone. "
    "New messages that arrive during a run wait in a queue until it ends.",
    "Agents can call tools that run on the server, such as reading the current time. A "
    "front-end tool runs in the browser instead, and the first tab to answer wins. Some tools "
    "need a person to approve them before they run. The request waits in the log until "
    "someone who may approve decides, possibly with edited arguments. Type `tools` in a "
    "message to see all three kinds in one run.",
    "Presence shows who is here, how many tabs they have open and who is typing. Share the "
    "link of a session to open it on another device or with another person. Tokens decide "
    "which sessions a person may read, write to or approve in.",
)
SIMULATED_CLOSERS: tuple[str, ...] = (
    "Nothing is lost.", "Sessions are durable.", "Approvals survive restarts.",
    "Every tab stays current.", "The log remembers everything.",
    "Try it in two tabs.", "Stop works from any tab.", "Refresh the page at any time.",
    "Every device sees the same text.", "A dropped network costs you nothing.",
    "Open this session on a second device.", "Every answer is kept in the log.",
    "This answer was written by a simulated model.", "Ask for tools to see a full run.",
)


def _sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.) (?=[A-Z])", paragraph) if s]


# (paragraph, words) for every sentence, in reading order.
_SENTENCES: tuple[tuple[int, tuple[str, ...]], ...] = tuple(
    (p, tuple(sentence.split()))
    for p, paragraph in enumerate(SIMULATED_TEXT) for sentence in _sentences(paragraph))
_PARAGRAPH_STARTS = tuple(i for i, (p, _) in enumerate(_SENTENCES)
                          if i == 0 or _SENTENCES[i - 1][0] != p)


def _closings() -> dict[int, list[tuple[str, ...]]]:
    """Word count → the ways to say that many words with one or two closing sentences."""
    closers = [tuple(c.split()) for c in SIMULATED_CLOSERS]
    ways: dict[int, list[tuple[str, ...]]] = {}
    for a in closers:
        ways.setdefault(len(a), []).append(a)
    for a in closers:
        for b in closers:
            if a != b:
                ways.setdefault(len(a) + len(b), []).append(a + b)
    return ways


_CLOSINGS = _closings()
_CLOSE_MIN = min(_CLOSINGS)  # 3 words
_CLOSE_MAX = max(n for n in range(_CLOSE_MIN, 100) if all(k in _CLOSINGS
                                                           for k in range(_CLOSE_MIN, n + 1)))
# The only answers shorter than a closing sentence.
_TINY = {1: ("Simulated.",), 2: ("Simulated", "answer.")}


@dataclass(frozen=True, slots=True)
class ScriptedCall:
    """A tool call the simulated model makes when ``when`` matches the conversation."""

    name: str
    arguments: dict[str, Any]


Script = Callable[[Sequence[Message]], ScriptedCall | None]


def call_tools_in_order(calls: Sequence[ScriptedCall]) -> Script:
    """A script that, per user turn, makes each call once (after the previous one's result)."""

    def script(messages: Sequence[Message]) -> ScriptedCall | None:
        turn_start = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
        made = sum(len(m.tool_calls) for m in messages[turn_start + 1:] if m.role == "assistant")
        return calls[made] if made < len(calls) else None

    return script


class SimulatedModel:
    """A deterministic simulated LLM. It is a stand-in: it does not understand anything.

    ``ttft`` seconds pass before the first chunk, then tokens arrive at ``tokens_per_second``
    (0 = as fast as possible). ``input_token_cost`` seconds per input token model prompt
    processing. The text (see :meth:`answer`) depends only on ``seed``, the conversation's length
    and its last message, so a rerun of a step produces the same text.
    """

    def __init__(self, *, seed: int = 0, ttft: float = 0.05, tokens_per_second: float = 65.0,
                 answer_tokens: int = 40, script: Script | None = None,
                 input_token_cost: float = 0.0, name: str = "tether-simulated") -> None:
        self.seed = seed
        self.ttft = ttft
        self.tokens_per_second = tokens_per_second
        self.answer_tokens = answer_tokens
        self.script = script
        self.input_token_cost = input_token_cost
        self.name = name

    def answer(self, messages: Sequence[Message]) -> list[str]:
        """The tokens (words) of the text answer to ``messages``: exactly ``answer_tokens``.

        Whole sentences of :data:`SIMULATED_TEXT`, read in order from the start of a paragraph
        that the seed and the conversation pick, then one or two of
        :data:`SIMULATED_CLOSERS` for the words left. A new paragraph starts with a blank line
        (Markdown).
        """
        last = messages[-1].content[:64] if messages else ""
        rng = random.Random(f"{self.seed}:{len(messages)}:{last}")
        left = max(0, self.answer_tokens)
        if left in _TINY:
            return [(" " if i else "") + w for i, w in enumerate(_TINY[left])]
        words: list[str] = []
        at = rng.choice(_PARAGRAPH_STARTS)
        paragraph = _SENTENCES[at][0]
        while left:
            p, sentence = _SENTENCES[at % len(_SENTENCES)]
            at += 1
            if len(sentence) == left or len(sentence) <= left - _CLOSE_MIN:
                if words and p != paragraph:
                    sentence = ("\n\n" + sentence[0], *sentence[1:])
                words.extend(sentence)
                paragraph = p
                left -= len(sentence)
            elif left <= _CLOSE_MAX:  # too long for what is left: close with that many words
                words.extend(rng.choice(_CLOSINGS[left]))
                left = 0
        return [w if not i or w.startswith("\n") else " " + w for i, w in enumerate(words)]

    async def stream(self, messages: Sequence[Message], tools: Sequence[ToolSpec]
                     ) -> AsyncIterator[Chunk]:
        input_tokens = sum(len(m.content) // 4 + 1 for m in messages)
        await asyncio.sleep(self.ttft + input_tokens * self.input_token_cost)
        call = self.script(messages) if self.script is not None else None
        if call is not None and any(t.name == call.name for t in tools):
            arguments = orjson.dumps(call.arguments).decode()
            call_id = f"call_{random.Random(f'{self.seed}:{len(messages)}').getrandbits(48):012x}"
            yield ToolCallDelta(0, call_id, call.name, "")
            for piece in _split(arguments, 8):
                await self._pace()
                yield ToolCallDelta(0, None, None, piece)
            yield Finish("tool_calls", {"input_tokens": input_tokens, "output_tokens": 8})
            return
        tokens = self.answer(messages)
        for token in tokens:
            yield TextDelta(token)
            await self._pace()
        yield Finish("stop", {"input_tokens": input_tokens, "output_tokens": len(tokens)})

    async def _pace(self) -> None:
        if self.tokens_per_second > 0:
            await asyncio.sleep(1.0 / self.tokens_per_second)


def _split(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


# --- OpenAI-compatible Chat Completions -------------------------------------------------------


class OpenAIChatModel:
    """Streaming Chat Completions with tools against any OpenAI-compatible server."""

    def __init__(self, model: str, *, base_url: str = "https://api.openai.com/v1",
                 api_key: str | None = None, timeout: float = 120.0,
                 client: httpx.AsyncClient | None = None, **params: Any) -> None:
        self.name = model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.params = params
        self._client = client or httpx.AsyncClient(timeout=timeout)

    async def stream(self, messages: Sequence[Message], tools: Sequence[ToolSpec]
                     ) -> AsyncIterator[Chunk]:
        body: dict[str, Any] = {"model": self.name, "stream": True,
                                "messages": [m.openai() for m in messages], **self.params}
        if tools:
            body["tools"] = [t.openai() for t in tools]
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        started = time.monotonic()
        async with self._client.stream("POST", f"{self.base_url}/chat/completions",
                                       content=orjson.dumps(body), headers=headers) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread())[:500].decode(errors="replace")
                raise ModelError(f"upstream answered {resp.status_code}: {detail}")
            finish: Finish | None = None
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    chunk = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    raise ModelError(f"malformed stream chunk: {payload[:100]!r}") from None
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        yield TextDelta(delta["content"])
                    for call in delta.get("tool_calls") or ():
                        function = call.get("function") or {}
                        yield ToolCallDelta(int(call.get("index", 0)), call.get("id"),
                                            function.get("name"), function.get("arguments") or "")
                    if choice.get("finish_reason"):
                        finish = Finish(choice["finish_reason"], chunk.get("usage") or {})
                if chunk.get("usage") and finish is not None:
                    finish = Finish(finish.reason, chunk["usage"])
            yield finish or Finish("stop", {"elapsed_ms": int((time.monotonic() - started) * 1000)})

    async def aclose(self) -> None:
        await self._client.aclose()
