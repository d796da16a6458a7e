"""``multiprocessing.connection.wait`` with one epoll set kept for the whole run.

``wait()`` builds a selector, registers every object and closes it again on
each call: at tens of thousands of loop iterations (one per reply batch) that
was a sixth of the runner's CPU.  :class:`Waiter` keeps one selector and, on
each call, registers only what is new and unregisters what is gone.

An object leaves the set in the first call that does not list it, and that
call unregisters what left before it registers what is new.  That is what
makes descriptor reuse safe:

* A connection closed in a handler (a dead worker's) and a new one that got
  the same descriptor number (its replacement's) are different objects: the
  old one is unregistered first (epoll has already forgotten it: a no-op),
  then the new one is registered.
* A sentinel is a bare int, so a new sentinel with an old number would look
  registered.  It cannot get that number while the old one is listed: the
  runner's handlers keep the dead Process, and so its sentinel descriptor,
  alive until they are rebuilt for the next call.  Nothing may close a
  sentinel that is still listed.
"""

from __future__ import annotations

import selectors
from collections.abc import Iterable
from typing import Any


def _fileno(obj: Any) -> int:
    return obj if isinstance(obj, int) else int(obj.fileno())


class Waiter:
    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._fds: dict[Any, int] = {}

    def wait(self, objects: Iterable[Any], timeout: float | None) -> list[Any]:
        """Like ``multiprocessing.connection.wait``: the objects ready to read."""
        wanted = set(objects)
        for obj in [o for o in self._fds if o not in wanted]:
            self._selector.unregister(self._fds.pop(obj))
        for obj in wanted:
            if obj not in self._fds:
                fd = _fileno(obj)
                self._selector.register(fd, selectors.EVENT_READ, obj)
                self._fds[obj] = fd
        return [key.data for key, _ in self._selector.select(timeout)]

    def close(self) -> None:
        self._selector.close()
        self._fds.clear()
