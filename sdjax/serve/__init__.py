"""The sdjax service: OpenAI-style video/image jobs over one scheduler per GPU group (`python -m sdjax.serve`)."""

from sdjax.serve.app import create_app
from sdjax.serve.settings import Settings, parse_settings

__all__ = ["Settings", "create_app", "parse_settings"]
