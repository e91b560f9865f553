"""A user's own functions, named as Prefect names entrypoints: `package.module:function` or
`path/to/file.py:function`.

`resolve` imports the function; `check_ref` only finds it (the module's source parsed, nothing
executed), so a CLI can refuse a wrong name in milliseconds, before TensorFlow loads. Every
refusal is one BadInputError naming the REF and the fix.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptflow.core.errors import BadInputError, first_line, is_transient

_REF = re.compile(r"^(?P<where>[^:]+):(?P<name>[A-Za-z_]\w*)$")


def is_ref(text: str) -> bool:
    """Whether `text` is written as a REF (`module:function` or `file.py:function`)."""
    return bool(_REF.match(text))


def split_ref(ref: str, what: str) -> tuple[str, str]:
    """(module or file, function name) of `ref`; `what` names the option in errors (--model)."""
    match = _REF.match(ref)
    if not match:
        raise BadInputError(f"{what} {ref!r} is not a REF. Expected package.module:function or "
                            "path/to/file.py:function.")
    return match["where"], match["name"]


def check_ref(ref: str, what: str) -> None:
    """Refuse a REF whose module or file is missing, does not parse, or defines no such name
    (parsed only: nothing is imported or run)."""
    where, name = split_ref(ref, what)
    source = _source_file(where, ref, what)
    if source is None:  # a compiled or namespace module: only an import can tell
        return
    try:
        tree = ast.parse(source.read_text(), filename=str(source))
    except (SyntaxError, UnicodeDecodeError, OSError) as exc:
        raise BadInputError(f"{what} {ref}: {source} cannot be read as Python ({exc}). Fix the "
                            "file.") from exc
    defined = {node.name for node in tree.body
               if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    defined |= {target.id for node in tree.body if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)}
    imported = {alias.asname or alias.name.split(".")[0] for node in tree.body
                if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names}
    if name not in defined | imported:
        raise BadInputError(f"{what} {ref}: {source} defines no {name!r}. Name a function "
                            f"defined there (found: {', '.join(sorted(defined)) or 'none'}).")


def resolve(ref: str, what: str) -> Callable:
    """The function `ref` names, imported (a file REF's folder goes on sys.path, for its own
    imports; a module REF is looked up from the current directory too)."""
    where, name = split_ref(ref, what)
    check_ref(ref, what)
    try:
        module = _import_file(Path(where), ref) if where.endswith(".py") else \
            importlib.import_module(where)  # check_ref put the current directory on sys.path
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(f"{what} {ref}: importing {where} failed ({type(exc).__name__}: "
                            f"{first_line(exc)}). Fix the module, or install what it "
                            "imports.") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise BadInputError(f"{what} {ref}: {where} has no function {name!r}. Name a function "
                            "defined there.")
    return function


def call(function: Callable, ref: str, what: str, params: dict[str, Any],
         optional: dict[str, Any] | None = None) -> Any:
    """`function(**params)`, plus each `optional` keyword it accepts (e.g. `seed`); an unknown
    parameter or an error it raises is a BadInputError naming the REF, but network and disk
    errors stay themselves, so a retry can help."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        unknown = [k for k in params if k not in signature.parameters and not accepts_any]
        if unknown:
            takes = [p for p in signature.parameters if p not in (optional or {})]
            raise BadInputError(f"{what} {ref} takes no parameter {unknown[0]!r} (it takes: "
                                f"{', '.join(takes) or 'none'}). Fix the {what}-params.")
        extra = {k: v for k, v in (optional or {}).items()
                 if (k in signature.parameters or accepts_any) and k not in params}
    else:
        extra = {}
    try:
        return function(**params, **extra)
    except Exception as exc:
        if is_transient(exc):
            raise
        raise BadInputError(f"{what} {ref} raised {type(exc).__name__}: {first_line(exc)}. Fix "
                            f"the function or its {what}-params.") from exc


def _source_file(where: str, ref: str, what: str) -> Path | None:
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise BadInputError(f"{what} {ref}: file {where} not found (from {Path.cwd()}). Give "
                                "a path to an existing .py file, or package.module:function.")
        return path
    # `python -m` puts the current directory on sys.path; a console script does not.
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))
    spec = _find_spec(where)
    if spec is None:
        raise BadInputError(f"{what} {ref}: no module named {where!r}. Install it, run from the "
                            "folder that holds it, or give path/to/file.py:function.")
    origin = spec.origin
    return Path(origin) if origin and origin.endswith(".py") else None


def _find_spec(name: str):
    """`name`'s module spec, found as `import` would find it but with no module run
    (`importlib.util.find_spec` imports a dotted name's parent packages first)."""
    spec, search = None, None
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        part = ".".join(parts[:depth])
        module = sys.modules.get(part)
        if module is not None:
            spec, search = module.__spec__, getattr(module, "__path__", None)
            continue
        if search is None and depth > 1:  # the parent is a module, not a package
            return None
        spec = next((found for finder in sys.meta_path if hasattr(finder, "find_spec")
                     and (found := finder.find_spec(part, search)) is not None), None)
        if spec is None:
            return None
        search = spec.submodule_search_locations
    return spec


def _import_file(path: Path, ref: str):
    """A .py file imported once per process, under a name of its own (two files both called
    model.py do not collide), with its folder on sys.path for its sibling modules."""
    path = path.expanduser().resolve()
    name = f"ckptflow_user_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
