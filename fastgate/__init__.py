"""fastgate: an API-key edge in front of Ollama."""

__version__ = "0.1.0"
