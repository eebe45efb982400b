"""The network core's counters: by name, a missing one reads 0, so the core counts what
it sees (`counters["tcp connections"] += 1`) without declaring names first. (A dict with
__missing__: collections.Counter does that too, but its __delitem__ makes every store a
Python-level call.)"""


class Counts(dict):
    def __missing__(self, key: str) -> int:
        return 0
