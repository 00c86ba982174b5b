"""OpenAI Responses API, WebSocket mode included, on any model backend — with chains that survive
reconnects, restarts and a move to another node, because they live in the session store.

* ``GET /v1/responses`` (WebSocket upgrade): OpenAI's WebSocket mode — ``response.create`` with
  ``previous_response_id`` and only the new input items, ``stream_id`` lanes, ``generate: false``
  warm-ups, OpenAI's events and errors. The official ``openai`` SDK's
  ``client.responses.connect()`` works unchanged with ``base_url`` pointing here and a tether
  token as ``api_key``.
* ``POST /v1/responses``: the same over HTTP (SSE when ``stream`` is true), the stateless baseline.
* ``GET /v1/responses/{id}``: a stored response.

See ``docs/responses.md``.
"""

from tether.responses.backends import (
    SIMULATED_MODEL,
    Backend,
    Models,
    OpenAIChatBackend,
    SimulatedBackend,
)
from tether.responses.config import ResponsesConfig
from tether.responses.http import RESPONSES_KEY, install
from tether.responses.service import ResponsesService

__all__ = [
    "RESPONSES_KEY",
    "SIMULATED_MODEL",
    "Backend",
    "Models",
    "OpenAIChatBackend",
    "ResponsesConfig",
    "ResponsesService",
    "SimulatedBackend",
    "install",
]
