"""Undoable, invisible patches: how `forksafe.instrument` wraps constructors.

A target is written ``"module:qualname"``: a class's ``__init__``
(``"MySQLdb.connections:Connection.__init__"``), after which ``hook(self)`` runs, or a
module-level function (``"psycopg2:connect"``), after which ``hook(result)`` runs.

The wrapper is invisible to code that inspects the original: it is generated with the
original's exact parameters (names, kinds and default values), so ``inspect.signature``,
``__code__.co_varnames`` and ``co_argcount`` read as before. SQLAlchemy, for one, reads the
keyword names ``create_engine`` accepts from ``Engine.__init__``'s code object.

Each patch remembers the original; `Patch.undo` puts it back only if the attribute still
holds our wrapper. If another library wrapped it after us, its wrapper is left in place
(ours inside it stays, and does nothing once forksafe is not instrumenting) and the caller
is told why.
"""

from __future__ import annotations

import inspect
import keyword
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Patch", "apply", "resolve_target", "target_module"]

_MISSING: Any = object()


@dataclass
class Patch:
    """One attribute we replaced, and how to put the original back."""

    target: str
    holder: Any
    attr: str
    original: Any  # what ``vars(holder)`` had (``_MISSING``: nothing; it was inherited)
    wrapper: Any

    def undo(self) -> str | None:
        """Restore the original if the attribute is still ours; else say why not."""
        current = vars(self.holder).get(self.attr, _MISSING)
        if current is not self.wrapper:
            return (
                f"{self.target} was replaced after forksafe.instrument() by "
                f"{_describe(current)}; left as it is (forksafe's wrapper inside it does "
                "nothing while forksafe is not instrumenting)"
            )
        if self.original is _MISSING:
            delattr(self.holder, self.attr)
        else:
            setattr(self.holder, self.attr, self.original)
        return None


def _describe(obj: Any) -> str:
    if obj is _MISSING:
        return "nothing (it was deleted)"
    module = getattr(obj, "__module__", None) or type(obj).__module__
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{name}"


def target_module(target: str) -> str:
    """The module a ``"module:qualname"`` target lives in."""
    return target.partition(":")[0]


def resolve_target(target: str) -> tuple[Any, str, bool]:
    """The object holding the attribute, the attribute's name, and whether it is ``__init__``.

    Only looks in ``sys.modules``: never imports anything.

    Raises:
        LookupError: the module is not imported, or the path does not exist in it.
    """
    module_name, _, qualname = target.partition(":")
    holder: Any = sys.modules.get(module_name)
    if holder is None:
        raise LookupError(f"{module_name} is not imported")
    *path, attr = qualname.split(".")
    for part in path:
        holder = getattr(holder, part)
    if not hasattr(holder, attr):
        raise LookupError(f"{target} does not exist")
    return holder, attr, attr == "__init__"


def apply(target: str, hook: Callable[[Any], None]) -> Patch:
    """Wrap ``target`` so that ``hook`` sees every object it creates; return the patch."""
    holder, attr, is_init = resolve_target(target)
    original_attr = vars(holder).get(attr, _MISSING)
    original = getattr(holder, attr)
    wrapper = signature_preserving(original, hook, pass_self=is_init)
    setattr(holder, attr, wrapper)
    return Patch(target, holder, attr, original_attr, wrapper)


def signature_preserving(
    original: Callable[..., Any], hook: Callable[[Any], None], *, pass_self: bool
) -> Callable[..., Any]:
    """A function with ``original``'s exact parameters that calls it, then ``hook``.

    ``hook`` gets the first argument (``self`` of an ``__init__``) if ``pass_self``, else
    the return value. A callable whose signature cannot be read (a C function) gets a
    ``(*args, **kwargs)`` wrapper.
    """
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        signature = None
    namespace: dict[str, Any] = {
        "__name__": __name__,  # its frames count as forksafe's (creation sites skip them)
        "_forksafe_original": original,
        "_forksafe_hook": hook,
    }
    if signature is None or any(
        not p.name.isidentifier() or keyword.iskeyword(p.name) or p.name.startswith("_forksafe")
        for p in signature.parameters.values()
    ):
        params, call = ["*args", "**kwargs"], ["*args", "**kwargs"]
        first = "args[0]"
    else:
        params, call = _parameters(signature, namespace)
        names = list(signature.parameters)
        first = names[0] if names else "None"
    name = getattr(original, "__name__", "wrapper")
    body = (
        f"def {name if name.isidentifier() else 'wrapper'}({', '.join(params)}):\n"
        f"    _forksafe_result = _forksafe_original({', '.join(call)})\n"
        f"    _forksafe_hook({first if pass_self else '_forksafe_result'})\n"
        f"    return _forksafe_result\n"
    )
    exec(compile(body, f"<forksafe wrapper of {name}>", "exec"), namespace)  # noqa: S102
    wrapper: Any = namespace[name if name.isidentifier() else "wrapper"]
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        value = getattr(original, attr, None)
        if value is not None:
            setattr(wrapper, attr, value)
    wrapper.__wrapped__ = original
    wrapper.__forksafe_wrapper__ = True
    return wrapper  # type: ignore[no-any-return]


def _parameters(
    signature: inspect.Signature, namespace: dict[str, Any]
) -> tuple[list[str], list[str]]:
    params: list[str] = []
    call: list[str] = []
    kinds = inspect.Parameter
    positional_only_done = False
    star_done = False
    for index, p in enumerate(signature.parameters.values()):
        if p.kind is not kinds.POSITIONAL_ONLY and not positional_only_done:
            positional_only_done = True
            if index and _kind_at(signature, index - 1) is kinds.POSITIONAL_ONLY:
                params.append("/")
        default = ""
        if p.default is not p.empty:
            namespace[f"_forksafe_default_{index}"] = p.default
            default = f"=_forksafe_default_{index}"
        if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD):
            params.append(f"{p.name}{default}")
            call.append(p.name)
        elif p.kind is kinds.VAR_POSITIONAL:
            params.append(f"*{p.name}")
            call.append(f"*{p.name}")
            star_done = True
        elif p.kind is kinds.KEYWORD_ONLY:
            if not star_done:
                params.append("*")
                star_done = True
            params.append(f"{p.name}{default}")
            call.append(f"{p.name}={p.name}")
        else:  # VAR_KEYWORD
            params.append(f"**{p.name}")
            call.append(f"**{p.name}")
    if not positional_only_done and params:
        params.append("/")
    return params, call


def _kind_at(signature: inspect.Signature, index: int) -> Any:
    return list(signature.parameters.values())[index].kind
