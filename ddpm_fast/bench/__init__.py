"""`ddpm-fast bench`: check and time every op on every backend, the reference, torch.compile of it and
diffusers' schedulers; sampling loops. ``main(argv) -> int`` is the command; see runner.py."""
from .runner import main

__all__ = ["main"]
