"""Grounding for serving: the rollouts' :class:`~ulrec.grounding.Grounder` plus a nearest-item
search that skips excluded items (the fallback when sampling keeps repeating recommended items)."""

from __future__ import annotations

from ulrec.errors import InputError
from ulrec.grounding import Grounder


class ServeGrounder(Grounder):
    def nearest_allowed(self, text: str, excluded: set[int]) -> int:
        """The catalogue item nearest to ``text`` by embedding that is not in ``excluded``.

        Searching the ``len(excluded) + 1`` nearest items is exact: at least one of them is allowed.
        """
        allowed = len(self.titles) - len(excluded & set(range(len(self.titles))))
        if allowed < 1:
            raise InputError("nearest_allowed: every catalogue item is excluded")
        self.ensure_index()
        depth = min(len(self.titles), len(excluded) + 1)
        _, idx = self._index.search(self.embed([text]), depth)
        return next(int(i) for i in idx[0] if i >= 0 and int(i) not in excluded)
