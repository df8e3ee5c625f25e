"""Naming functions across workers: caller-side specs and callee-side resolution.

A function travels as ``"module:qualname"``. Functions of the driver's ``__main__``
script travel as ``["__main__:qualname", "/path/to/script.py"]``: a worker whose own
``__main__`` is another file imports that script once under the module name
``__mp_main__`` (as multiprocessing does), so its ``if __name__ == "__main__":`` block
does not run. Functions of a module beside the driver's script travel as
``["module:qualname", "/path/to/script.py"]``: the worker puts the script's folder
first on its import path, as it does to import the script itself.

Both carry a third element, the driver's session (a random id per driver process).
The first call of a new session makes a worker look at the files of the driver code it
imported from that folder (the script, the modules beside it, those imported while its
functions ran): if one changed on its disk (size or modification time), or a module
appeared whose file it never saw, it forgets every module it imported from that folder
and imports them anew. A cluster outlives its runs (`actorgrad cluster`, then the
script run, edited, run again): the workers used to run the first version they had
imported, silently, and did not find functions added since. A session keeps what it
resolved, so two runs at once of different versions of one script each keep theirs
(but for modules looked up by name while they run).
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import secrets
import sys
import time
import tokenize
import types
import zipimport
from collections.abc import Callable
from typing import Any, TypeVar

from actorgrad.errors import cut_text, short_repr

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

MAIN_ALIAS = "__mp_main__"

_spec_cache: dict[object, str | list[Any]] = {}
_resolve_cache: dict[Any, Any] = {}
#: Most entries _spec_cache keeps, and most "module:name" strings _resolve_cache does:
#: past it, they start again (as the codec's per-type cache, wire._DISPATCH_MAX). Each
#: distinct name a call named was kept for good, on the caller and on the worker, where
#: the names come from its peers' calls (what they like: 3,000 distinct ones, 3,000
#: entries, with what each resolved to). Names resolved with a driver's session (tuple
#: keys) are not dropped so: a run keeps what it resolved (see _new_session).
_NAMES_KEPT = 1024


_real_paths: dict[str, str] = {}


def _real(path: str) -> str:
    """``os.path.realpath(path)``, once per path (module files do not move)."""
    real = _real_paths.get(path)
    if real is None:
        real = _real_paths[path] = os.path.realpath(path)
    return real


def _main_path() -> str | None:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None and main is not None:
        path = _ran_script(main)
    return _real(path) if path else None


def _ran_script(main: Any) -> str | None:
    """The file of the script that ``__main__`` ran, once Python dropped its
    ``__file__`` (it does when the script's code returns: ``python -i script.py`` at
    its prompt, a thread outliving the script), as its loader says; else None (``python
    -c``, a script read from stdin, a prompt: no loader of a file)."""
    loader = _module_attr(main, "__loader__")
    if type(loader) is not importlib.machinery.SourceFileLoader or loader.name != "__main__":
        return None
    path = loader.path
    return path if isinstance(path, str) else None


def _archive_of(path: str) -> str | None:
    """The zip archive holding file ``path`` (``app.pyz/__main__.py``), else None."""
    head = os.path.dirname(path)
    while head and head != os.path.dirname(head):
        if os.path.isfile(head):
            # (imported here: zipfile, with pathlib, bz2 and lzma, cost every worker
            # process ~5 ms of its start, and a driver in a zip is rare)
            import zipfile

            return head if zipfile.is_zipfile(head) else None
        if os.path.isdir(head):
            return None
        head = os.path.dirname(head)
    return None


def _main_name() -> str | None:
    """The module name this process's script runs as (``python -m pkg.train``: its
    relative imports need it), else None (``python train.py``, or actorgrad's own entry
    points: a worker process runs ``-m actorgrad.runtime.worker_main``)."""
    name = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    if not isinstance(name, str) or name in ("__main__", MAIN_ALIAS):
        return None
    return None if name.partition(".")[0] == "actorgrad" else name


#: this process's session: functions of its script travel with it (see the docstring)
SESSION = secrets.token_hex(8)
#: driver scripts of other processes whose functions this worker resolved: the session
#: it last saw for each (a worker passing on such a function names that session)
_sessions: dict[str, str] = {}


def _session_of(script: str) -> str:
    return _sessions.get(script, SESSION)


def _module_name_of(script: str) -> str | None:
    """The module name driver script ``script`` runs as (``python -m``): this
    process's own, or the one its functions said (a worker passing them on)."""
    return _main_name() if script == _main_path() else _module_names.get(script)


def _main_spec(name: str, path: str) -> list[Any]:
    """The wire name of ``name``, a function of driver script ``path``
    ("__main__:qualname") or of a module beside it ("module:qualname")."""
    spec = [name, path, _session_of(path)]
    module = _module_name_of(path)
    if module is not None:
        spec.append(module)
    return spec


def _home(script: str) -> str:
    """The folder of the import path that driver script ``script`` imports its modules
    from: the script's own, or with ``python -m pkg.train`` the one holding ``pkg``."""
    home = _homes.get(script)
    if home is None:
        home = os.path.dirname(script)
        name = _module_name_of(script)
        if name is not None:
            for _ in name.split(".")[1:]:
                home = os.path.dirname(home)
        _homes[script] = home
    return home


#: the module name each driver script runs as (``python -m``), as its functions said
_module_names: dict[str, str] = {}
_homes: dict[str, str] = {}


def fn_spec(fn: Any) -> str | list[Any]:
    """The wire name of ``fn``. Raises TypeError for anything that cannot be imported by
    name on another worker (lambdas, closures, nested functions, bound methods...),
    ValueError for a name that does not look like ``module:qualname``."""
    if isinstance(fn, str):
        m, sep, q = fn.partition(":")
        if not sep or not m or not q:
            head, dot, tail = fn.rpartition(".")
            guess = (
                f" ({head + ':' + tail!r}?)"
                if not sep and dot and head and tail.isidentifier() and len(fn) <= 200
                else ""
            )
            raise ValueError(
                f"function name {short_repr(fn, 80)} must look like 'module:qualname'{guess}"
            )
        if m == "__main__":  # this process's script, as for its functions themselves
            path = _main_path()
            if path is None:
                return fn
            main = sys.modules["__main__"]
            if "__file__" not in vars(main):  # (`python -i script.py`, at its prompt)
                obj = _lookup(vars(main), q)
                if isinstance(obj, (types.FunctionType, type)) and _interactive(obj):
                    return _interactive_spec(obj, q)  # (typed there, maybe anew)
            return _main_spec(fn, path)
        # (a module beside the script: as for its functions themselves; cached, with
        # the same check of the session as theirs)
        cached = _spec_cache.get(fn)
        if cached is None or not _current_session(cached):
            if m.partition(".")[0] not in sys.modules:
                return fn  # (not imported here: nothing says where it lies)
            script = _script_beside(m)
            cached = fn if script is None else _main_spec(fn, script)
            _keep_spec(fn, cached)
        return cached
    if type(fn) is list and len(fn) in (2, 3, 4) and all(isinstance(x, str) for x in fn):
        return fn  # already a wire name (a __main__ function)
    try:
        cached = _spec_cache.get(fn)
    except TypeError:  # unhashable callable
        cached = None
    if cached is not None:
        _check_named(fn)  # (rebound since it was cached)
        if _current_session(cached):
            return cached
    if not callable(fn):
        raise TypeError(
            f"cannot call {short_repr(fn, 80)} remotely: not callable (fn, the second "
            "argument, is a function, a class or a 'module:qualname' string)"
        )
    owner = getattr(fn, "__self__", None)
    mod: Any = getattr(fn, "__module__", None)
    qual: Any = getattr(fn, "__qualname__", None)
    if isinstance(fn, types.MethodType) and isinstance(owner, type):
        # a classmethod: found by name on the worker too, as an attribute of the class
        # it was taken from (Sub.make runs with Sub, though its qualname says Base.make)
        mod, qual = owner.__module__, f"{owner.__qualname__}.{fn.__name__}"
        _check_named(owner)
    elif isinstance(fn, types.MethodType) or (
        isinstance(fn, types.BuiltinMethodType)
        and owner is not None
        and not isinstance(owner, (types.ModuleType, type))
    ):
        raise TypeError(
            f"cannot call bound method {fn.__qualname__!r} remotely: pass a module-level "
            "function, or hold the object in an RRef and use rref.rpc().method(...)"
        )
    if mod is None and isinstance(owner, type):  # (a builtin classmethod: dict.fromkeys)
        mod = owner.__module__
    objclass = getattr(fn, "__objclass__", None)
    if mod is None and isinstance(objclass, type):  # (a builtin's method: str.upper)
        mod = objclass.__module__
    if not isinstance(qual, str) and not isinstance(fn, type):
        raise TypeError(
            f"cannot call {fn!r:.80} remotely: an object of type {type(fn).__name__} is not found by "
            "name on another worker; pass a module-level function (with its arguments in "
            "args), or a module-level class to construct the object there"
        )
    if not isinstance(mod, str) or not isinstance(qual, str) or "<" in qual:
        what = getattr(fn, "__qualname__", None) or repr(fn)
        raise TypeError(
            f"cannot call {what!r} remotely: lambdas, closures and nested functions cannot be "
            "found by name on another worker; use a module-level function or class"
        )
    _check_named(fn)
    spec: str | list[Any]
    if mod == "__main__" and _interactive(fn):
        spec = _interactive_spec(fn, qual)
    elif mod in ("__main__", MAIN_ALIAS):
        if mod == "__main__":
            path = _main_path()
        else:  # (a worker passing on a function of a driver's script)
            path = _script_globals(fn, qual).get("__file__")
        if not path:
            raise TypeError(
                f"cannot call {qual!r} remotely: it lives in an interactive __main__ without a file"
            )
        spec = _main_spec(f"__main__:{qual}", os.path.realpath(path))
    else:
        spec = f"{mod}:{qual}"
        script = _script_beside(mod)
        if script is not None:  # (the worker puts the script's folder on its path)
            spec = _main_spec(spec, script)
    # A new object under a name resolved before (a module reloaded, a function defined
    # anew): this process's own workers would run the old one, from the cache.
    key = spec if type(spec) is str else tuple(spec)
    old = _resolve_cache.get(key)
    if old is not None and _unbound(old) is not _unbound(fn):
        # (popped, not deleted: fn_spec may run off the loop (a DistributedOptimizer
        # made in a function run in the pool), and the loop's resolve of a peer's call
        # that reached the bound meanwhile dropped it already, see _drop_names)
        _resolve_cache.pop(key, None)
    try:
        _keep_spec(fn, spec)
    except TypeError:  # unhashable callable
        pass
    return spec


def _keep_spec(fn: Any, spec: str | list[Any]) -> None:
    if len(_spec_cache) >= _NAMES_KEPT:
        _spec_cache.clear()  # (those in use come back at their next call)
    _spec_cache[fn] = spec


def _interactive_spec(fn: Any, qual: str) -> list[Any]:
    """The wire name of ``fn``, defined interactively (a prompt's, a notebook cell's):
    no file holds it, so only this process's own workers can run it; the name says
    which object (see INTERACTIVE)."""
    where = f"{INTERACTIVE}{id(fn):x}>"
    _interactive_fns[where] = fn
    return [f"__main__:{qual}", where, SESSION]


#: the path in the wire name of a function defined interactively (at a prompt, in a
#: notebook cell, by ``python -c``, or in a script read from stdin): no file to import
#: it from, so it names the object itself, for this process's own workers
#: (``["__main__:f", "<interactive 7f...>", session]``)
INTERACTIVE = "<interactive "
#: functions and classes defined interactively that were named for a call, by the path
#: their wire names carry (kept: a call may still be on its way to a worker here)
_interactive_fns: dict[str, Any] = {}
#: the file names Python's and IPython's prompts give the code typed at them
_PROMPTS = ("<stdin>", "<console>", "<python-input-", "<ipython-input-")


def _interactive(fn: Any) -> bool:
    """Whether ``fn``, of ``__main__``, was defined where no worker process can import
    it from a file: this process has no script file (a prompt, a notebook, ``python
    -c``, a script read from stdin), its script does not hold ``fn`` under its name
    (the asyncio REPL's namespace), or ``fn`` was typed at a prompt (``python -i
    script.py``: once the script ran, only the functions compiled from its file, and
    the classes holding one, are the script's)."""
    main = sys.modules.get("__main__")
    path = _main_path()
    if path is None or not (os.path.isfile(path) or _archive_of(path)):
        return True
    if _unbound(_lookup(getattr(main, "__dict__", {}), fn.__qualname__)) is not _unbound(fn):
        return True
    if isinstance(fn, type):  # (the functions defined in its body)
        inner = fn.__qualname__ + "."
        funcs = [f for v in vars(fn).values() for f in _functions_of(v)]
        funcs = [f for f in funcs if getattr(f, "__qualname__", "").startswith(inner)]
    else:
        funcs = [inspect.unwrap(_unbound(fn))]
    files = [getattr(getattr(f, "__code__", None), "co_filename", "") for f in funcs]
    if any(f.startswith(_PROMPTS) for f in files):
        return True
    if "__file__" not in vars(main):
        # (its script ran, and Python dropped its __file__: `python -i script.py`. Code
        # compiled from that file is the script's; a class with no function of its own
        # compiled from it (a dataclass's come from "<string>", an Enum or a class of
        # attributes has none) is the script's if the script defines a class of that
        # name with the same names in its body: one typed at the prompt has no file)
        if any(f and _real(f) == path for f in files):
            return False
        return not (isinstance(fn, type) and _script_class(path, fn.__qualname__) == _names_of(fn))
    return False


def _functions_of(value: Any) -> tuple[Any, ...]:
    """The functions a class attribute holds: a method's, a static or class method's, a
    property's accessors."""
    if isinstance(value, property):
        return tuple(f for f in (value.fget, value.fset, value.fdel) if f is not None)
    return (getattr(value, "__func__", value),)


def _names_of(cls: type) -> frozenset[str]:
    """The public names a class's body gave it: its attributes and annotations."""
    try:
        # (its own annotations: from 3.14 on they are no longer in the class's dict)
        annotated = inspect.get_annotations(cls)
    except Exception:  # (one naming what does not exist, evaluated from 3.14 on)
        annotated = vars(cls).get("__annotations__", {})
    names = set(vars(cls)) | set(annotated)
    return frozenset(n for n in names if not n.startswith("_"))


#: script path -> (its _signature, {class qualname: the public names in its body})
_script_classes: dict[str, tuple[tuple[int, int], dict[str, frozenset[str]]]] = {}


def _script_class(path: str, qual: str) -> frozenset[str] | None:
    """The public names the body of class ``qual`` of script ``path`` assigns, annotates
    or defines (its last definition at the top level, or nested in such a class's
    body), as the file on disk says (what a worker importing it will find); None when
    the script defines no such class or cannot be read or parsed."""
    stamp = _signature(path)
    if stamp is None:
        return None
    known = _script_classes.get(path)
    if known is None or known[0] != stamp:
        try:
            with tokenize.open(path) as f:
                source = f.read()
        except (OSError, SyntaxError, UnicodeDecodeError):  # (SyntaxError: a bad coding)
            return None
        try:
            classes = _classes_in(ast.parse(source, path).body, "")
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            # (kept too: a script edited into a syntax error was parsed again at each
            # call naming one of its classes. MemoryError, RecursionError: the parser's
            # own, for code nested too deeply; it went up to the caller's call)
            classes = {}
        known = _script_classes[path] = (stamp, classes)
    return known[1].get(qual)


def _classes_in(body: list[ast.stmt], prefix: str) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for node in body:
        if not isinstance(node, ast.ClassDef):
            continue
        names: set[str] = set()
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(stmt.name)
            elif isinstance(stmt, ast.Assign):
                names.update(t.id for t in stmt.targets if isinstance(t, ast.Name))
            elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
                if isinstance(stmt.target, ast.Name):
                    names.add(stmt.target.id)
        qual = prefix + node.name
        out[qual] = frozenset(n for n in names if not n.startswith("_"))
        out.update(_classes_in(node.body, qual + "."))
    return out


#: how a function or class of a ``python -i script.py`` driver was found defined
#: interactively (see _interactive): a class of the script not at its top level, or
#: unlike the class of that name there, is taken for one typed at the prompt, and its
#: author, who wrote it in the script, is told why
_PROMPT_OF_SCRIPT = (
    "at the prompt of python -i; a class with no function of its own written in the "
    "script is the script's only where the script's top level defines a class of that "
    "name with the same public names in its body"
)


def interactive_fn(name: str, path: str, session: str, dest: str | None = None) -> Any:
    """The function named by the wire name of one defined interactively, if this is the
    process that defined it; else TypeError saying what to do (``dest``: the worker a
    caller was to call it on)."""
    fn = _interactive_fns.get(path) if session == SESSION else None
    if fn is None:
        qual = name.partition(":")[2]
        where = "here" if dest is None else f"on worker {dest!r}"
        how = "at a prompt, in a notebook cell, with python -c, or in a script read from stdin"
        main = sys.modules.get("__main__")
        if dest is not None and main is not None and "__file__" not in vars(main):
            how = how if _ran_script(main) is None else _PROMPT_OF_SCRIPT
        raise TypeError(
            f"cannot call {qual!r} {where}: it was defined interactively in the driver "
            f"({how}), where no file holds it, so a worker process cannot "
            "import it. Put it in a module (a .py file beside the notebook, or one the "
            "workers find on their path), import it and pass that; or use in-process "
            "workers (ag.local_cluster(n) without processes=True), which run it as it is"
        )
    return fn


def _current_session(spec: str | list[Any]) -> bool:
    """Whether a cached wire name still names its driver's latest session (a driver's
    function this worker passes on travels with it: the one it was cached with may be
    over)."""
    return type(spec) is not list or spec[2] == _session_of(spec[1])


def _check_named(fn: Any) -> None:
    """TypeError when the name of ``fn`` (``module:qualname``) names another object
    here: the worker would run that one (a function rebound away from its name: a hot
    patch, a mock, a re-decoration), silently. As pickle, which refuses it. A name not
    found here is left to the worker to report. Only for Python functions and classes:
    other callables (``list[int]``, builtins bound anew on each access) name what the
    worker runs."""
    if not isinstance(fn, (types.FunctionType, type)):
        return
    mod, qual = fn.__module__, fn.__qualname__
    found: Any
    if mod == MAIN_ALIAS:
        found = _lookup(_script_globals(fn, qual), qual)
    else:
        found = sys.modules.get(mod)
        for part in qual.split("."):
            found = getattr(found, part, None)
    if found is not None and found is not fn:
        raise TypeError(
            f"cannot call {fn!r:.80} remotely: it is not the object named {mod}:{qual} "
            "(that name was rebound to another), which is what the worker would run"
        )


def _script_globals(fn: Any, qual: str) -> dict[str, Any]:
    """The globals of the driver script imported here (as ``__mp_main__``) that defines
    ``fn``; not those of the module ``sys.modules["__mp_main__"]`` names: the last
    imported (of several drivers' scripts, or versions of one), or after an ``import
    multiprocessing`` this process's own ``__main__``."""
    candidates = [getattr(fn, "__globals__", None)]  # (functions, classmethods)
    wrapped = getattr(fn, "__wrapped__", None)  # (functools.cache, wraps of another module)
    if wrapped is not None:
        candidates.append(getattr(_unbound(wrapped), "__globals__", None))
    if isinstance(fn, type):  # (a class: those of the functions defined in its body)
        for v in vars(fn).values():
            v = getattr(v, "__func__", v)
            candidates.append(getattr(v, "__globals__", None))
    candidates += [module.__dict__ for module in _main_modules.values()]
    for globals_ in candidates:
        if isinstance(globals_, dict) and _unbound(_lookup(globals_, qual)) is _unbound(fn):
            return globals_
    return getattr(sys.modules.get(MAIN_ALIAS), "__dict__", {})


def _lookup(globals_: dict[str, Any], qual: str) -> Any:
    """The object ``qual`` names in a module of globals ``globals_``, else None."""
    first, _, rest = qual.partition(".")
    obj = globals_.get(first)
    for part in rest.split(".") if rest else ():
        obj = getattr(obj, part, None)
    return obj


def _unbound(fn: Any) -> Any:
    """``fn``, or for a classmethod taken from its class, the function."""
    return fn.__func__ if isinstance(fn, types.MethodType) else fn


def _script_beside(mod: str) -> str | None:
    """The path of the driver script that module ``mod`` sits beside (its folder, or
    its top package's parent, is the script's), else None: a worker finds such a module
    only with the script's folder on its path (``from model import Net`` in the script,
    then ``ag.remote("w1", Net)``)."""
    top = sys.modules.get(mod.partition(".")[0])
    where = _module_attr(top, "__file__")
    if where:
        paths = [os.path.abspath(where), _real(where)]
    else:  # (a namespace package: a folder without __init__.py)
        paths = [os.path.join(p, "__init__.py") for p in list(_module_attr(top, "__path__") or ())]
    main = _main_path()
    # (the folder it was imported from, or its file's real one: a symbolic link beside
    # the script to code elsewhere sits beside it too)
    for path in paths:
        home = os.path.dirname(path)
        if os.path.basename(path) == "__init__.py":
            home = os.path.dirname(home)
        if main is not None and _home(main) == home:
            return main
        script = _script_folders.get(home)  # (a worker passing on a driver's function)
        if script is not None:
            return script
    return None


#: per folder of driver code (a script's home): the files of the modules this worker
#: imported from it, by module name, with their (size, mtime) when first seen
_folder_files: dict[str, dict[str, tuple[str, tuple[int, int]]]] = {}
#: per folder of driver code: the names of every module ever imported from it here
#: (kept when the modules are forgotten: see _check_no_clash)
_folder_names: dict[str, set[str]] = {}
#: per folder of driver code: the modules it held (see _modules_in) when imported from
_listings: dict[str, frozenset[str]] = {}
_STARTED = time.time()
#: folders forgotten for another folder's script, whose imports are noted once it ran
_renote: set[str] = set()
#: per folder of driver code: when this worker last looked at its files (time.time())
_looked_at: dict[str, float] = {}
#: (size, mtime) of each driver script when this worker imported it
_main_sigs: dict[str, tuple[int, int] | None] = {}
#: sys.modules when this module was first imported (a worker process's start-up): the
#: worker's own modules, never driver code
_baseline: frozenset[str] = frozenset(sys.modules)
#: per driver script: its sessions, least recently seen first (what they resolved is
#: kept for the last KEEP_SESSIONS of them: so many runs of a script at once)
_script_sessions: dict[str, list[str]] = {}
KEEP_SESSIONS = 32


def _signature(path: str) -> tuple[int, int] | None:
    """(size, mtime) of file ``path``; of its archive for one in a zip (``app.pyz/
    __main__.py``, a module beside it there): a rebuilt archive changed them all."""
    try:
        st = os.stat(path)
    except OSError:
        archive = _archive_of(path)
        return None if archive is None else _signature(archive)
    return (st.st_size, st.st_mtime_ns)


def _installed(path: str) -> bool:
    """Whether module file ``path`` is Python's own or an installed package's (never
    driver code, though it may lie in the driver's folder: a virtualenv there)."""
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return any(
        path.startswith(prefix + os.sep)
        for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    )


def _from_folder(folder: str) -> dict[str, str]:
    """The modules of ``sys.modules`` imported from driver folder ``folder``: their
    files lie inside it (also those found through another path entry: a ``src/``
    layout), but not the worker's own, installed ones, nor those a driver folder
    inside this one imported by its own path (``sub/mod.py`` as ``mod``; as ``sub.mod``
    it is this folder's), by name, with their real file paths."""
    inside = folder + os.sep
    nested = [other for other in _folder_names if other.startswith(inside)]
    found = {}
    for name, module in list(sys.modules.items()):
        if name in _baseline or name == MAIN_ALIAS or name.partition(".")[0] == "actorgrad":
            continue  # (scripts: see _main_sigs)
        where = _module_attr(module, "__file__")
        if not isinstance(where, str):
            # (a namespace package: no file, but forgotten too, or its attribute for a
            # submodule would keep the old one: `from lib import core`)
            path = _module_attr(module, "__path__")
            if path is not None and any(p.startswith(inside) for p in list(path)):
                found[name] = ""
            continue
        real = _real(where)
        # (its path as imported, or its real one: a symbolic link inside the folder to
        # code elsewhere is the driver's code too)
        if not (where.startswith(inside) or real.startswith(inside)) or _installed(real):
            continue
        if nested and any(_imported_from(other, name, where) for other in nested):
            continue
        found[name] = real
    return found


def _module_attr(module: Any, name: str) -> Any:
    """``getattr(module, name, None)``, None too when a module object of the user's
    raises from its ``__getattr__`` (KeyError: it would fail every driver call)."""
    try:
        return getattr(module, name, None)
    except Exception:
        return None


def _imported_from(folder: str, name: str, path: str) -> bool:
    """Whether module ``name``, file ``path``, was imported with ``folder`` on the path:
    ``folder/pkg/mod.py`` for ``pkg.mod``."""
    head, tail = os.path.split(os.path.abspath(path))
    stem = os.path.join(head, tail.partition(".")[0])  # (mod.py, mod.cpython-311-....so)
    expected = os.path.join(folder, *name.split("."))
    return stem == expected or stem == os.path.join(expected, "__init__")


def _note_imports(folder: str) -> None:
    """Record the files of the modules imported from ``folder`` not yet recorded."""
    seen = _folder_files.setdefault(folder, {})
    names = _folder_names.setdefault(folder, set())
    _looked_at.setdefault(folder, time.time())
    if folder not in _listings:
        _listings[folder] = frozenset(_modules_in(folder))
    for name, real in _from_folder(folder).items():
        names.add(name)
        if name not in seen and real:  # (a namespace package has no file)
            sig = _signature(real)
            if sig is not None:
                seen[name] = (real, sig)


def _changed(folder: str) -> bool:
    """Whether driver code imported from ``folder`` changed on this worker's disk since
    it was imported. A module imported unseen (while a function ran) counts as changed
    if its file was modified since this worker last looked (it may have been after the
    import); else it is noted as it is. So does a module file added to the folder, or
    removed (``try: import fast_impl`` / ``except ImportError:`` found nothing)."""
    listing = _listings.get(folder)
    if listing is not None and frozenset(_modules_in(folder)) != listing:
        return True
    seen = _folder_files.setdefault(folder, {})
    # (a folder never looked at: its modules another folder's code imported count as
    # changed if modified since this process started, not all of them: those of an
    # outer folder's running script were forgotten under it)
    since = _looked_at.get(folder, _STARTED)
    found = _from_folder(folder)
    for name, real in found.items():
        known = seen.get(name)
        if not real:  # (a namespace package: its modules say)
            _folder_names.setdefault(folder, set()).add(name)
        elif known is None:
            sig = _signature(real)
            if sig is None:  # (gone since)
                continue
            if sig[1] >= since * 1e9:
                return True
            seen[name] = (real, sig)
            _folder_names.setdefault(folder, set()).add(name)
        elif known[0] != real or _signature(real) != known[1]:
            return True
    for name, (real, sig) in seen.items():  # (those _from_folder no longer lists)
        if name not in found and (name not in sys.modules or _signature(real) != sig):
            # (one forgotten since, by another folder's new run (a driver folder inside
            # this one): what this folder's modules hold of it is no longer current)
            return True
    return False


def _new_session(script: str, session: str) -> None:
    """The first call of a driver ``session`` for ``script``: forget the driver code
    imported from the script's folder if it changed (see the module docstring)."""
    _sessions[script] = session
    if _main_path() == script:
        return  # (this process's own script)
    folder = _home(script)
    if folder in _script_folders:
        # (the folder's script whose run came last: a function of a module beside it
        # that this worker passes on travels with that run, which the next worker then
        # checks the folder for. Named with the folder's first script and the session
        # it last saw for that one, a run of another script of the folder reached the
        # next worker as an old run, and it called what it had resolved then)
        _script_folders[folder] = script
    sessions = _script_sessions.setdefault(script, [])
    if session in sessions:
        # (a run seen already, its calls interleaved with another's: not a new run,
        # and one under way keeps its code)
        sessions.remove(session)
        sessions.append(session)
        return
    sessions.append(session)
    if len(sessions) > KEEP_SESSIONS:  # (what the least recently seen one resolved goes)
        old = sessions.pop(0)
        for key in [k for k in _resolve_cache if type(k) is tuple and k[1:3] == (script, old)]:
            del _resolve_cache[key]
    stale = script in _main_modules and _signature(script) != _main_sigs.get(script)
    stale = stale or _changed(folder)
    _looked_at[folder] = time.time()
    if stale:
        _forget(folder)
        return
    # Modules of other driver folders its kept script holds (a script of scripts/
    # importing the project root's model): changed there, they are forgotten, and the
    # script with them; one forgotten already (by that folder's own new run) too.
    kept = _main_modules.get(script)
    if kept is None:
        return
    values = list(vars(kept).values())
    used = {_module_of(v) for v in values}
    for other in list(_folder_files):
        if other != folder and used & _folder_names.get(other, set()) and _changed(other):
            _looked_at[other] = time.time()
            _forget(other)
            _renote.add(other)  # (what this script imports of it anew: see resolve)
    names = _all_folder_names()
    if not all(_current(v, names) for v in values):
        _forget(folder)


def _seen_again(script: str, session: Any) -> None:
    """A call of ``session`` of driver script ``script`` found what it resolved: that
    run is the script's most recently seen one (a run whose calls all found theirs was
    taken for the least recently seen, and past KEEP_SESSIONS newer runs its next call
    got the edited code midway)."""
    sessions = _script_sessions.get(script)
    if sessions and sessions[-1] != session and session in sessions:
        sessions.remove(session)
        sessions.append(session)


def _module_of(v: Any) -> str | None:
    """The name of module ``v``, or of the module that defines ``v``."""
    try:
        name = v.__name__ if isinstance(v, types.ModuleType) else getattr(v, "__module__", None)
    except Exception:  # (an object of the user's whose attributes raise)
        return None
    return name if isinstance(name, str) else None


def _current(v: Any, names: set[str]) -> bool:
    """Whether ``v`` (a global of a driver script) is what its module's name gives now,
    for driver code (modules named in ``names``); a module forgotten since, or a class
    of its old version, is not."""
    mod = _module_of(v)
    if mod not in names:
        return True
    module = sys.modules.get(mod)
    if isinstance(v, types.ModuleType):
        return module is v
    if module is None:
        return False
    if not isinstance(v, (types.FunctionType, type)):
        return True  # (an instance, an alias (Box[int]), a wrapper: nothing to compare)
    try:
        found = _lookup(vars(module), v.__qualname__)
    except Exception:
        return True
    # (only another function or class under its name says it is an old version: not a
    # name of its own (namedtuple("Pt") bound as Point), nor a decorated one)
    if not isinstance(found, (types.FunctionType, type)):
        return True
    return found is v or getattr(v, "__wrapped__", None) is found


def _all_folder_names() -> set[str]:
    return set().union(*_folder_names.values()) if _folder_names else set()


def _forget(folder: str) -> None:
    """Forget the driver code imported from ``folder`` (its scripts, its modules): the
    next call imports it anew."""
    for path in [p for p in _main_modules if _home(p) == folder]:
        del _main_modules[path]
    names = _from_folder(folder)
    # (modules being imported in another call's thread need their entries, and those
    # of their packages, till the import ends)
    busy = [
        name
        for name in names
        if getattr(getattr(sys.modules.get(name), "__spec__", None), "_initializing", False)
    ]
    forgotten = set()
    for name in names:
        if any(b == name or b.startswith(name + ".") for b in busy):
            continue
        sys.modules.pop(name, None)
        forgotten.add(name)
    _folder_files[folder] = {}  # (the names stay in _folder_names: see _check_no_clash)
    _listings.pop(folder, None)
    # What other sessions resolved stays theirs ("a run keeps the functions it already
    # called"); names resolved without a session ("module:function" strings) follow
    # the code on disk.
    for key, fn in list(_resolve_cache.items()):
        if type(key) is str and getattr(fn, "__module__", None) in forgotten:
            _resolve_cache.pop(key, None)  # (maybe dropped meanwhile: see fn_spec)
    importlib.invalidate_caches()  # (a module added beside the script meanwhile)


def _use_folder_of(script: str) -> None:
    """Put the folder of driver script ``script`` first on this worker's import path,
    as `python script.py` has it on the driver (refused if a module beside it has the
    name of one imported from another script's folder: see _check_no_clash)."""
    if _main_path() == script:
        return  # (this process's own script: its folder is on the path already)
    folder = _home(script)
    if (script, folder) in _checked_scripts:
        return
    # (for each script of a folder: a file that was the script of one run may be a
    # module of another script of the folder: `python model.py`, then `python train.py`)
    _check_no_clash(folder, script)
    # (first, as on the driver: its working directory or PYTHONPATH may have it, after
    # another folder, or site-packages for an editable install, holding a module of
    # one name)
    if folder not in sys.path:
        _put_on_path.add(folder)  # (taken off again with its last script: see _drop_script)
    # (one assignment: an import in another call's thread sees the path whole)
    sys.path[:] = [folder, *(p for p in sys.path if p != folder)]
    _script_folders.setdefault(folder, script)
    _checked_scripts.add((script, folder))


def _modules_in(folder: str, namespaces: bool = False) -> dict[str, str]:
    """The modules folder ``folder`` holds (``.py`` files and packages), by name, with
    their entries; with ``namespaces``, also the folders without ``__init__.py`` that
    hold ``.py`` files (namespace packages)."""
    try:
        entries = os.listdir(folder)
    except NotADirectoryError:
        return _modules_in_archive(folder, namespaces)
    except OSError:
        return {}
    found = {}
    for entry in entries:
        if entry.endswith(".py"):
            name = _py_module(entry)
            if name is not None:
                found[name] = entry
        elif os.path.isfile(os.path.join(folder, entry, "__init__.py")):
            found[entry] = entry  # a package
        elif namespaces and entry.isidentifier() and _holds_python(os.path.join(folder, entry)):
            found[entry] = entry
    return found


def _py_module(entry: str) -> str | None:
    """The module a ``.py`` file ``entry`` of a folder on the path is imported as, or
    None: no code imports these by name (a package's own files, a project's setup, an
    editor's lock file ".#train.py")."""
    name = entry[:-3]
    return name if name.isidentifier() and name not in _NOT_IMPORTED else None


def _modules_in_archive(archive: str, namespaces: bool) -> dict[str, str]:
    """``_modules_in`` for a zip archive on the path (a driver's ``app.pyz``)."""
    import zipfile  # (see _archive_of)

    try:
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return {}
    found = {}
    for entry in names:
        first, sep, rest = entry.partition("/")
        if not sep and first.endswith(".py"):
            name = _py_module(first)
            if name is not None:
                found[name] = first
        elif (
            sep
            and first.isidentifier()
            and (rest == "__init__.py" or (namespaces and rest.endswith(".py") and "/" not in rest))
        ):
            found[first] = first
    return found


def _holds_python(folder: str) -> bool:
    try:
        return any(e.endswith(".py") for e in os.listdir(folder))
    except OSError:
        return False


_NOT_IMPORTED = frozenset({"__init__", "__main__", "setup", "conftest"})


def _check_no_clash(folder: str, script: str) -> None:
    """RuntimeError when a module beside driver script ``script`` has the name of one
    in another driver script's folder on this worker's path, or of one the worker
    imported from there (forgotten since, too), or from anywhere but its installed
    packages (a module of its working directory, called by name): one process holds
    one module per name, and one of the scripts would silently run the other
    project's (the first folder on the path wins, also for an import that comes later,
    inside a function). Scripts are imported by path, not by name: two folders' train.py
    are no clash, unless one of them was imported by name too; nor is a folder without
    ``__init__.py`` (maybe a namespace package, maybe tests/ or docs/) unless the other
    folder's was imported."""
    scripts = _folder_scripts.setdefault(folder, set())
    scripts.add(os.path.basename(script)[:-3])
    mine = _modules_in(folder, namespaces=True)
    packages = _modules_in(folder)  # (files and packages with __init__.py)
    for other in _script_folders:
        if other == folder:
            continue
        theirs = _modules_in(other)
        their_scripts = _folder_scripts.get(other, set())
        imported = _folder_names.get(other, ())
        for name, entry in sorted(mine.items()):
            if name in imported or (
                name in packages
                and name not in scripts
                and name in theirs
                and name not in their_scripts
            ):
                _clash(folder, entry, name, f"{other} (another driver script's folder)")
    for name, entry in sorted(packages.items()):
        where = _module_attr(sys.modules.get(name), "__file__")
        if (
            isinstance(where, str)
            and name != "actorgrad"
            and not _imported_from(folder, name, where)
            and not _imported_from(folder, name, _real(where))
            and not _installed(_real(where))
        ):
            _clash(folder, entry, name, os.path.dirname(os.path.abspath(where)))


def _clash(folder: str, entry: str, name: str, other: str) -> None:
    raise RuntimeError(
        f"the driver script's folder {folder} holds {entry!r}, but this worker already "
        f"has a module {name!r} from {other}: one worker process holds one module per "
        "name. Give the modules distinct names, or use workers of their own for each "
        "project"
    )


#: folders of driver scripts this worker put on its import path, and the script of
#: each whose run came last
_script_folders: dict[str, str] = {}
#: driver scripts, with their folders, checked for modules of another folder's names
_checked_scripts: set[tuple[str, str]] = set()
#: per folder of driver scripts: the module names of its scripts (see _check_no_clash)
_folder_scripts: dict[str, set[str]] = {}
#: folders of driver scripts that were not on this worker's import path before
_put_on_path: set[str] = set()

#: Driver scripts this worker resolved functions of, least recently called first. Past
#: KEEP_SCRIPTS of them, the least recently called one is forgotten whole, its folder
#: too when no other kept script is in it (see _drop_script): a cluster that many
#: scripts use over days (each job's own folder) kept each one's module, with what its
#: top level made, its modules, sessions and folder on the import path, for good.
_scripts_used: dict[str, None] = {}
KEEP_SCRIPTS = 1024


def _used_script(script: str) -> None:
    """Driver script ``script`` is called now: it becomes the most recently used."""
    if _scripts_used and next(reversed(_scripts_used)) == script:
        return  # (the common case: calls of one run, one after another)
    _scripts_used.pop(script, None)
    _scripts_used[script] = None
    while len(_scripts_used) > KEEP_SCRIPTS:
        _drop_script(next(iter(_scripts_used)))


def _drop_script(script: str) -> None:
    """Forget driver script ``script``: what this worker resolved of it and kept for it
    (its module, its sessions), and its folder, its modules and their place on the
    import path when no other kept script is in that folder. Called again, it is
    imported anew, as a script never seen (a function of it running meanwhile keeps
    the globals it has)."""
    _scripts_used.pop(script, None)
    own = _main_path()
    if script == own:
        return  # (this process's own script: nothing is kept for it, nor forgotten)
    folder = _home(script)
    _sessions.pop(script, None)
    _script_sessions.pop(script, None)
    _main_modules.pop(script, None)
    _main_sigs.pop(script, None)
    _homes.pop(script, None)
    _module_names.pop(script, None)
    _checked_scripts.discard((script, folder))
    for key in [k for k in list(_resolve_cache) if type(k) is tuple and k[1] == script]:
        _resolve_cache.pop(key, None)
    if folder not in _script_folders:
        return  # (never put on the path for a script: nothing of it is this one's)
    others = [s for s in list(_scripts_used) if _home(s) == folder]
    if others:
        if _script_folders.get(folder) == script:
            _script_folders[folder] = others[-1]
        return
    if own is not None and _home(own) == folder:
        return  # (this process's own folder: its modules are never forgotten)
    _forget(folder)
    _script_folders.pop(folder, None)
    _folder_scripts.pop(folder, None)
    _folder_files.pop(folder, None)
    _folder_names.pop(folder, None)
    _listings.pop(folder, None)
    _looked_at.pop(folder, None)
    _renote.discard(folder)
    if folder in _put_on_path:
        _put_on_path.discard(folder)
        sys.path[:] = [p for p in sys.path if p != folder]


#: Told ``True`` before this process runs the top level of a driver's script or of a
#: module beside it, found for a call, and ``False`` after: it runs on the worker's
#: loop, maybe for seconds (a data set loaded), and the runtime tells the peers not to
#: take the silence for a hang (see Worker.going_quiet).
on_import: Callable[[bool], None] | None = None


def _import_quietly(run: Callable[[], T]) -> T:
    """``run()``, which imports a driver's code, between the two ``on_import`` calls."""
    notice = on_import
    if notice is None:
        return run()
    notice(True)
    try:
        return run()
    finally:
        notice(False)


# driver scripts imported on this worker, by real path. Not looked up in sys.modules:
# the first ``import multiprocessing`` anywhere rebinds sys.modules["__mp_main__"] to this
# process's own __main__, and a second import of the script would split its globals.
_main_modules: dict[str, types.ModuleType] = {}


def _main_module(path: str) -> types.ModuleType:
    if _main_path() == path:
        return sys.modules["__main__"]
    module = _main_modules.get(path)
    if module is not None:
        return module
    # (run as `python -m pkg.train`: imported with that name's spec, so that its
    # relative imports find its package, but named __mp_main__, as multiprocessing does)
    is_file = os.path.isfile(path)
    archive = None if is_file else _archive_of(path)
    if not is_file and archive is None:
        raise ModuleNotFoundError(
            f"the driver's script {path} (to call one of its functions) is not on this "
            "worker's disk: copy it there under the same path, or call functions of "
            "installed modules"
        )
    name = _module_names.get(path, MAIN_ALIAS)
    spec: importlib.machinery.ModuleSpec | None
    if archive is not None:
        # (`python app.pyz`: its __main__.py, loaded from the archive as Python does,
        # with the archive first on the path, for the modules it holds)
        loader: Any = zipimport.zipimporter(os.path.dirname(path))
        loader.invalidate_caches()  # (the archive may have been rebuilt since: see _forget)
        spec = importlib.machinery.ModuleSpec(name, loader, origin=path)
        spec.has_location = True
    else:
        # (a loader of its own: a script without .py, an executable `train`, has none)
        spec = importlib.util.spec_from_file_location(
            name, path, loader=importlib.machinery.SourceFileLoader(name, path)
        )
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"cannot import the driver script {path!r}")
    sig = _signature(path)  # (before: an edit while it is imported is a change)
    # (its `from model import Net` finds the module beside it: a worker joined from
    # another folder found none)
    _use_folder_of(path)
    module = importlib.util.module_from_spec(spec)
    module.__name__ = MAIN_ALIAS
    saved = sys.modules.get(MAIN_ALIAS)
    sys.modules[MAIN_ALIAS] = module  # its classes and dataclasses look themselves up here
    try:
        # (as runpy: the loader's exec_module refuses a module named otherwise than it)
        stem = os.path.basename(path).rpartition(".")[0] if archive else spec.name
        code = spec.loader.get_code(stem)  # type: ignore[attr-defined]
        _import_quietly(lambda: exec(code, module.__dict__))
    except BaseException as exc:
        if saved is None:
            sys.modules.pop(MAIN_ALIAS, None)
        else:
            sys.modules[MAIN_ALIAS] = saved
        if isinstance(exc, ImportError):
            raise RuntimeError(
                f"importing the driver's script {path} here (to call one of its functions) "
                f"failed: {type(exc).__name__}: {exc}. This worker looked beside the script "
                "and on its own path (PYTHONPATH): install what it imports for the workers "
                "too, or put it where they find it"
            ) from exc
        if isinstance(exc, (Exception, SystemExit)):
            # (mostly a script that starts its work at the top level: here it would
            # start an event loop inside the worker's, or exit the worker)
            _close_unstarted_coroutines(exc)
            # (argparse at the top level exits: "unrecognized arguments: --join=...", its
            # usage naming worker_main.py, on the worker's stderr)
            also = (
                " (argument parsing too: here it parses the worker's command line, not the "
                "driver's)"
                if isinstance(exc, SystemExit)
                else ""
            )
            raise RuntimeError(
                f"importing the driver's script {path} here (to call one of its functions) "
                f"failed: {type(exc).__name__}: {exc}. Its top level runs on every worker "
                f'that calls into it: start the work under `if __name__ == "__main__":`{also}'
            ) from exc
        raise
    sys.modules[MAIN_ALIAS] = module  # again: the script may have imported multiprocessing
    _main_modules[path] = module
    _main_sigs[path] = sig
    return module


def _close_unstarted_coroutines(exc: BaseException) -> None:
    """Close the coroutines never started that the frames ``exc`` went through held
    (the script's ``asyncio.run(main())``, refused inside the worker's loop), and those
    they were given (``main()`` held by a wrapper coroutine of the script's own):
    collected later, each printed "coroutine 'main' was never awaited", pointing at our
    code. (The script's import failed: nothing of it will start them.)"""
    todo: list[Any] = []
    # (a task's coroutine, made at the top level and handed to the worker's loop, is
    # the task's to run)
    try:
        owned = {id(t.get_coro()) for t in asyncio.all_tasks()}
    except RuntimeError:  # (no loop running in this thread)
        owned = set()
    tb = exc.__traceback__
    while tb is not None:
        todo.extend(tb.tb_frame.f_locals.values())
        tb = tb.tb_next
    while todo:
        value = todo.pop()
        # (type(), not isinstance: a lazy proxy among the script's globals, whose
        # __class__ raises, replaced the error this import was to raise; one met again
        # is closed by then)
        if (
            type(value) is types.CoroutineType
            and id(value) not in owned
            and inspect.getcoroutinestate(value) == "CORO_CREATED"
        ):
            if value.cr_frame is not None:  # (its arguments and free variables)
                todo.extend(value.cr_frame.f_locals.values())
            value.close()


def resolve(spec: Any) -> Any:
    """The callable named by ``spec`` (callee side). Raises ModuleNotFoundError,
    AttributeError or ValueError with a message naming the function."""
    key = spec if isinstance(spec, str) else tuple(spec) if isinstance(spec, list) else None
    if key is None:
        # (short_repr: a target from the wire may be huge, or fail to repr, nested 990
        # deep; the whole of a 60,000-character one went into the error reply, twice)
        raise ValueError(f"malformed function name {short_repr(spec, 200)}")
    try:
        fn = _resolve_cache.get(key)
    except TypeError:  # (a list in the list, from the wire: "unhashable type: 'list'")
        raise ValueError(f"malformed function name {short_repr(spec, 200)}") from None
    if fn is not None:
        if type(key) is tuple:
            _used_script(key[1])
            if len(key) >= 3:
                _seen_again(key[1], key[2])
        return fn
    session: str | None = None
    if isinstance(spec, str):
        name, path = spec, None
    else:
        if len(spec) not in (2, 3, 4) or not all(isinstance(s, str) for s in spec):
            raise ValueError(f"malformed function name {short_repr(spec, 200)}")
        name, path = spec[0], spec[1]
        if not path.startswith(INTERACTIVE):
            _used_script(path)
        if len(spec) >= 3:
            session = spec[2]
        module = spec[3] if len(spec) == 4 else None
        if len(spec) >= 3 and _module_names.get(path) != module:
            # (the script runs as a module of its package now, or no longer: run with
            # `python -m pkg.train`, then as `python pkg/train.py`)
            if module is None:
                del _module_names[path]
            elif not all(part.isidentifier() for part in module.split(".")):
                raise ValueError(f"malformed module name in function name {short_repr(spec, 200)}")
            else:
                _module_names[path] = module
            _homes.pop(path, None)
    if path is not None and path.startswith(INTERACTIVE):
        return interactive_fn(name, path, session or "")
    mod, sep, qual = name.partition(":")
    if not sep or not mod or not qual:
        where = (
            ""
            if spec is name
            else f" (in {short_repr(spec, 200)}: ['module:name', script path, ...])"
        )
        raise ValueError(f"malformed function name {short_repr(name, 200)}{where}")
    if path is not None and session is not None and _sessions.get(path) != session:
        _new_session(path, session)
    try:
        if path is not None and mod == "__main__":
            module = _main_module(path)
        else:
            if path is not None:  # a module beside the driver's script
                _use_folder_of(path)
            try:
                if path is not None and mod not in sys.modules:
                    module = _import_quietly(lambda: importlib.import_module(mod))
                else:
                    module = importlib.import_module(mod)
            except ModuleNotFoundError as exc:
                raise ModuleNotFoundError(
                    f"cannot call {name!r}: no module named {exc.name!r}", name=exc.name
                ) from None
    finally:
        if path is not None and _main_path() != path:
            _note_imports(_home(path))
            while _renote:  # (other folders forgotten for this script: their files now)
                _note_imports(_renote.pop())
    obj: Any = module
    for part in qual.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"cannot call {name!r}: {mod!r} has no attribute {qual!r}"
            ) from None
    if not callable(obj):
        raise TypeError(f"cannot call {name!r}: it is not callable")
    if type(key) is str and len(_resolve_cache) >= _NAMES_KEPT:
        _drop_names()
    _resolve_cache[key] = obj
    return obj


def _drop_names() -> None:
    """Drop what "module:name" strings resolved to, when the cache holds _NAMES_KEPT
    entries (a name resolves again to what its module, kept in sys.modules, holds)."""
    # (a copy of the keys first, in one step: a call resolved in another thread, a
    # staged optimizer's, may add one meanwhile)
    names = [k for k in list(_resolve_cache) if type(k) is str]
    if len(names) >= _NAMES_KEPT // 2:  # (else: mostly a session's, kept; see _NAMES_KEPT)
        for k in names:
            _resolve_cache.pop(k, None)


#: internal targets, as messages name them (a user never wrote these names)
_DESCRIBED = {"actorgrad.runtime.rref:_fetch": "RRef.to_here"}


#: Most characters of a target's name in messages: one from the wire may be 60,000
#: (a malformed call's went whole into the log line saying it was refused)
_NAME_SHOWN = 200


def describe(spec: Any) -> str:
    """A call's target as messages name it: a function by its name, a method called
    through an RRef (``[rref id, method]``) by the method and the RRef's id. A target
    from the wire may be anything: it is shown cut, and never fails to be (a list
    nested 990 deep failed in ``str``, and the one-way call it came in, refused with a
    message naming it, went on unrefused).

    >>> describe([0x2000000000001, "incr"])
    "method 'incr' of RRef 0x2000000000001"
    >>> describe(["mod:" + "f" * 300])[-9:]
    'ffffff...'
    """
    if isinstance(spec, list) and spec:
        if type(spec[0]) is int:
            method = spec[1] if len(spec) > 1 else None
            return f"method {short_repr(method, 80)} of RRef {spec[0]:#x}"
        spec = spec[0]  # (a function of a script: [name, script path, ...])
    if isinstance(spec, str):
        name = _DESCRIBED.get(spec, spec)
        return cut_text(name, _NAME_SHOWN)
    return short_repr(spec, 80)


def inline(fn: F) -> F:
    """Mark ``fn`` (a plain, non-blocking function) to always run inline on the worker's
    loop: called synchronously where the request is read, never in the thread pool nor
    as a task, its result replied at once. Meant for short protocol handlers (e.g. the
    distributed backward's); a blocking or slow one stalls the whole worker. Sets
    ``fn.__actorgrad_inline__ = True``, which is what the worker checks; on an
    ``async def`` function the marker has no effect."""
    fn.__actorgrad_inline__ = True  # type: ignore[attr-defined]
    return fn
