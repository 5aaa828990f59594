"""fsdp_fastload: load a pretrained model onto every rank of a distributed job, fast and correctly.

Rank `src` holds the weights, every other rank a `meta` skeleton; one collective call,
`materialize`, gives every rank the identical model on its device.
"""
from .agree import MaterializeError
from .api import materialize
from .ops import _load_extension, extension_available

_load_extension()  # once, at import (never raises; logs why if it falls back)

__all__ = ["materialize", "MaterializeError", "extension_available"]
__version__ = "0.1.0"
