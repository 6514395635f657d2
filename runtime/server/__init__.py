"""HTTP service (FastAPI + uvicorn) over the engine; ``create_app`` and ``serve`` are the entry points."""
