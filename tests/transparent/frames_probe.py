"""Torch-free probe of pyckpt/frames.py on whatever interpreter runs it (test_loopstate_versions.py).

    python frames_probe.py path/to/pyckpt/frames.py   -> one JSON line
"""
import importlib.util, itertools, json, sys
spec = importlib.util.spec_from_file_location("frames", sys.argv[1])
F = importlib.util.module_from_spec(spec); spec.loader.exec_module(F)
ok = {}
def probe():
    ok["active_loops"] = F.active_loops(sys._getframe(1)) == 3
    return F.loop_iterators(sys._getframe(1))
def loop(data):
    k = 5
    def inner(): return k
    for epoch in range(3):
        for i, x in enumerate(data):
            with open("/dev/null") as fh:
                for a, b in zip(range(5), itertools.count(7)):
                    try:
                        its = probe()
                    finally:
                        pass
                    return its
its = loop([10, 20, 30])
ok["nested loops"] = its is not None and [type(t).__name__ for t in its] == ["range_iterator", "enumerate", "zip"]
def gen(n):
    t = 0
    for q in range(n):
        t += q
        yield q
g = gen(5); next(g); next(g)
gi = F.loop_iterators(g.gi_frame)
ok["generator frame"] = gi is not None and len(gi) == 1 and gi[0].__length_hint__() == 3
def writer():
    a, b = 1, "x"
    F.write_locals(sys._getframe(), {"a": 41, "b": "y"})
    return a, b
ok["write_locals"] = writer() == (41, "y")
def resumed():  # a resume puts a running loop at a saved position: consume, then set the index
    seen = []
    for i, x in enumerate([10, 20, 30, 40, 50]):
        if not seen:
            its = F.loop_iterators(sys._getframe())
            inner = its[0].__reduce__()[1][0]
            next(inner); next(inner)
            F.set_enumerate_index(its[0], 3)
        seen.append((i, x))
    return seen
ok["restore position"] = resumed() == [(0, 10), (3, 40), (4, 50)]
def cells(a, b):  # an argument that is also a cell: 3.9/3.10 give it two slots
    def inner(): return a
    for q in [1, 2, 3]:
        its = F.loop_iterators(sys._getframe())
        return its is not None and its[0].__length_hint__() == 2 and inner() == a
ok["cell argument"] = cells(1, 2)
e = enumerate("abcdef"); next(e)
ok["enumerate index"] = F.set_enumerate_index(e, 4) and next(e) == (4, "b")
def nested():
    for r in range(2):
        for s in [1, 2]:
            return F.position(sys._getframe()), F.code_key(sys._getframe().f_code)
ok["position/code_key"] = nested()[0] > 0 and len(nested()[1]) == 4
print(json.dumps({"version": sys.version.split()[0], "supported": F._supported(), "checks": ok}))
