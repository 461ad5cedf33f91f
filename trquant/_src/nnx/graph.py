"""Reading and editing an NNX model's graph by key: the helpers model surgery and AdaRound share.

A module's place in a model is a path of keys, as ``nnx.iter_modules`` gives it: attribute
names of modules and indices / keys of ``nnx.List``, ``nnx.Dict`` and plain containers
(``("blocks", 0, "attn", "query")``).

* :func:`children`: the ``(key, child)`` pairs of a node;
* :func:`get_child`: one child by key; :func:`module_at`: the node at a path;
* :func:`set_at`: replaces the node at a path (a tuple on the way is rebuilt).
"""

from __future__ import annotations

from flax import nnx

__all__ = ["children", "get_child", "module_at", "set_at"]

_INDEXED = (list, tuple, dict, nnx.List, nnx.Dict)


def children(node) -> list:
  """The ``(key, child)`` pairs of a module, an NNX container or a plain list / tuple / dict."""
  if isinstance(node, nnx.List):
    return list(enumerate(node))
  if isinstance(node, nnx.Dict):
    return list(node.items())
  if isinstance(node, nnx.Pytree):
    return [(key, value) for key, value in vars(node).items() if not key.startswith("_pytree__")]
  if isinstance(node, (list, tuple)):
    return list(enumerate(node))
  if isinstance(node, dict):
    return list(node.items())
  return []


def get_child(node, key):
  """``node[key]`` for a container, ``getattr(node, key)`` for a module."""
  if isinstance(node, _INDEXED):
    return node[key]
  return getattr(node, key)


def module_at(root, path):
  """The node at ``path`` (a sequence of keys) below ``root``; ``root`` for ``()``.

  Example:
    >>> from flax import nnx
    >>> from trquant._src.nnx import graph
    >>> net = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.relu)
    >>> type(graph.module_at(net, ("layers", 0))).__name__
    'Linear'
  """
  node = root
  for key in path:
    node = get_child(node, key)
  return node


def set_at(root, path, value) -> None:
  """Replaces the node at ``path`` (non-empty) below ``root`` by ``value``, in place.

  A tuple on the way (which cannot be assigned into) is rebuilt with the new item and set
  in its own parent (a NamedTuple keeps its type).
  """
  path = tuple(path)
  if not path:
    raise ValueError("`path` must name a node below the root, got ().")
  parent = module_at(root, path[:-1])
  key = path[-1]
  if isinstance(parent, tuple):
    items = list(parent)
    items[key] = value
    rebuilt = type(parent)(*items) if hasattr(parent, "_fields") else tuple(items)
    set_at(root, path[:-1], rebuilt)
  elif isinstance(parent, _INDEXED):
    parent[key] = value  # type: ignore[index]  # a list, dict, nnx.List or nnx.Dict
  else:
    setattr(parent, key, value)
