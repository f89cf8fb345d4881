"""Whisper: encoder, guarded decoding and checkpoint readers (split by job in the next step)."""
from .encoder import *  # noqa: F401,F403
from .encoder import __all__  # noqa: F401
