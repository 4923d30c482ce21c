"""`trtc serve`: the OpenAI-compatible HTTP server."""
