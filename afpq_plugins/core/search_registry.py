"""The scale-search registry: names and JSON forms of the group-scale searches, in one leaf module.

A *search* picks each group's parameters. ``None``/``"minmax"`` is the paper's choice (no
search); the others are registered by the modules that define them, on import of
:mod:`afpq_plugins.core` (``"mse"``: :class:`~afpq_plugins.core.search.ScaleSearch`;
``"output"``: :class:`~afpq_plugins.core.output_search.OutputSearch`).
:func:`resolve_search` turns a name, a dict (the JSON form stored in checkpoints) or an
object into a search; :func:`search_dict` is the reverse. This module imports nothing of
the package, so every quantize path can depend on it without a cycle.
"""

from __future__ import annotations

from typing import Callable, Dict

__all__ = ["SEARCHES", "register_search", "resolve_search", "search_dict"]

#: Scale-search name -> factory ``(settings dict without "method") -> search object or None``.
SEARCHES: Dict[str, Callable[[dict], object]] = {"minmax": lambda kw: None}


def register_search(name: str, factory: Callable[[dict], object]) -> None:
    """Add a scale search: ``factory(settings)`` returns an object with ``params`` and ``to_dict``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_search: name must be a non-empty string, got {name!r}")
    SEARCHES[name] = factory


def _expected() -> str:
    return f"None, {', '.join(map(repr, SEARCHES))} or a ScaleSearch"


def resolve_search(search):
    """``None``/``"minmax"`` -> None (the paper's scales); a name -> its default search object.

    A dict (what ``to_dict`` and :func:`search_dict` write) is read back; a search object
    (anything with ``params``) passes through.
    """
    if search is None:
        return None
    if isinstance(search, str):
        if search not in SEARCHES:
            raise ValueError(f"scale search {search!r}: expected {_expected()}")
        return SEARCHES[search]({})
    if isinstance(search, dict):
        method = search.get("method", "mse")
        if method not in SEARCHES:
            raise ValueError(f"scale search {search!r}: unknown method {method!r} (expected one of {', '.join(SEARCHES)})")
        return SEARCHES[method]({k: v for k, v in search.items() if k != "method"})
    if callable(getattr(search, "params", None)):
        return search
    raise ValueError(f"scale search {search!r}: expected {_expected()}")


def search_dict(search) -> dict:
    """JSON form of a search setting: ``{"method": "minmax"}`` or the search's ``to_dict()``."""
    search = resolve_search(search)
    return search.to_dict() if search is not None else {"method": "minmax"}
