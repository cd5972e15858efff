"""facetrec: multi-interest recommendation — MIND retrieval, DIEN ranking, UIE cold start, served over HTTP."""

__version__ = "0.1.0"
