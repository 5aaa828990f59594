"""The side-by-side benchmark: ``python -m fsdp_fastload bench`` (see ``cli`` for what it runs).

``methods`` holds the registry (add a row with ``@method``), ``models`` what is loaded, ``worker`` one
rank of one run, ``runner`` the fresh processes and medians, ``sweep`` the scaling sweep, ``report``
the markdown. Nothing heavy is imported here: transformers/accelerate load in the workers only.
"""
from .cli import main
from .methods import METHODS, Ctx, Method, method

__all__ = ["main", "METHODS", "Ctx", "Method", "method"]
