"""Stateful continuation benchmark: an agent loop over stateless HTTP (full history each turn)
against OpenAI-style WebSocket continuation (``previous_response_id`` + new items), same server,
same simulated model, same script — over loopback and over an emulated slow link."""
