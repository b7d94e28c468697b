"""pyckpt.carried: the variables a training loop carries, read from the running script's source."""
from __future__ import annotations

import sys

from pyckpt import carried


def _fit(hook, loader):
    total, history, meters, mask = 0, [], {"seen": 0}, [1]
    lr = 0.1  # configuration: set before the loop
    hook(sys._getframe())  # no loop runs here
    for epoch in range(2):
        running = 0.0
        for i, x in enumerate(loader):
            running += x * lr
            history.append(running)  # changed in place
            meters["seen"] += 1
            mask.count(1)  # read only
            total += 1
            squares = [v * v for v in range(3)]  # v: the comprehension's own
            hook(sys._getframe())

            def inner():
                hidden = 1  # the nested function's own
                return hidden
        avg = running / 2
        while avg > 100:
            avg, spare = avg / 2, avg
    return total, avg, squares, inner


def test_loop_names_are_what_the_running_loops_assign_less_their_headers():
    seen = []
    _fit(lambda f: seen.append(carried.loop_names(f)), [1.0, 2.0])
    assert seen[0] == set()
    # the epoch loop's body (the inner loop's, the while loop's) less the headers of the loops running there;
    # not lr (set before), not the function defined in the loop (code, not a value it carries)
    assert seen[1] == {"running", "total", "squares", "avg", "spare", "history", "meters"}
    assert all(s == seen[1] for s in seen[1:])


def test_loop_names_of_a_decorated_method_are_found_by_its_first_line():
    def deco(fn):
        return fn

    class Trainer:
        @deco
        def fit(self, hook):
            step = 0
            while step < 2:
                step += 1
                self.last = step
                hook(sys._getframe())

    seen = []
    Trainer().fit(lambda f: seen.append(carried.loop_names(f)))
    assert seen == [{"step", "self"}, {"step", "self"}]  # (self: an object, left out where values are put back)


def test_global_names_are_those_a_function_assigns_through_global(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "step = 0\nbest = None\nMAX = 3\n"
        "def train_step():\n    global step, best, MAX\n    step += 1\n    if step > 1:\n        best = step\n"
        "    print(MAX)\n"  # declared, never assigned: not the function's to carry
        "def other():\n    global seen\n    def inner():\n        seen = 2\n    return inner\n"
        "def evaluate(log):\n    total = 1\n    losses.append(total)\n    log.append(total)\n"
        "    total.bit_length()\n    return total\n")
    # losses: a global changed in place; log: the function's parameter; total: its local
    assert carried.global_names(str(script)) == {"step", "best", "losses"}
    assert carried.global_names(str(tmp_path / "missing.py")) == set()
