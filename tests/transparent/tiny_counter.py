"""A helper of train_tiny.py MODE=modglobals reached only through a function the script imports from it
(``from tiny_counter import jitter``): a call counter in its globals shapes what the model sees."""
import torch

calls = 0


def jitter(x: torch.Tensor) -> torch.Tensor:
    global calls
    calls += 1
    return x + 0.01 * (calls % 7)
