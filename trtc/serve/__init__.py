"""`trtc serve`: an OpenAI-compatible HTTP server over the async engine (FastAPI + uvicorn)."""
