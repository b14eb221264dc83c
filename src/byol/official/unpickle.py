"""Read the released BYOL checkpoints (dill pickles) without running anything they name.

A pickle is a small program: each of its GLOBAL opcodes names a ``module.name`` that a plain
``pickle.load`` imports and may call, so loading an untrusted pickle can run any code
(``os.system`` included). :class:`RestrictedUnpickler` overrides ``find_class``, the one place
where pickle resolves such names, and admits only what the release's checkpoints contain, each
mapped to a stand-in of ours; any other name is refused before anything is imported or called,
with a :class:`RefusedPickle` that names it. There is no fallback to the full unpickler.

What is admitted (docs/fidelity.md):

- numpy arrays, dtypes and scalars, as written by numpy 1.x (``numpy.core.multiarray``) or 2.x
  (``numpy._core.multiarray``): the installed numpy's own reconstructors, whichever wrote them;
- jax arrays (the ``rng``): ``jax._src.array._reconstruct_array`` (jax >= 0.4) and
  ``jax._src.device_array.reconstruct_device_array`` (2022) rebuild a numpy array, without
  importing jax (the 2020 DeviceArray already pickled as a plain numpy array);
- the release's NamedTuples (``byol.byol_experiment._ByolExperimentState``, the LARS states of
  ``byol.utils.optimizers``, optax's ``*State``), whether pickled by reference or by value
  through dill's ``_create_namedtuple`` (what dill 0.3 always did): a :class:`Record` that only
  holds the values, never the real class;
- dill's ``_create_array`` (numpy's reconstructor only), haiku's ``FlatMapping`` / ``FlatMap`` /
  ``frozendict`` (pre-2022 haiku parameter trees: read as plain dicts), ``_codecs.encode`` (how
  protocol 2 stores ``bytes``: latin-1 text only) and a few builtin containers (set, frozenset,
  OrderedDict).
"""
from __future__ import annotations

import collections
import inspect
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from byol.data.errors import DataError


class RefusedPickle(DataError):
    """The pickle names a ``module.name`` that a BYOL checkpoint never contains; nothing ran."""


# The installed numpy's reconstructors, taken from numpy's own pickling (no private imports).
_NP_RECONSTRUCT = np.empty(0).__reduce__()[0]
_NP_SCALAR = np.float32(0).__reduce__()[0]
_NP_FROMBUFFER = np.empty(1).__reduce_ex__(5)[0]


class _Frozen(type):
    """Metaclass of the record stand-ins: a pickle's BUILD opcode cannot set attributes on them."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise DataError(f"a pickle tried to set {name!r} on the record class {cls.source}")


class Record(tuple, metaclass=_Frozen):
    """A NamedTuple of the release, as data: its values in order (a tuple), ``_fields`` their
    names (None when the pickle referenced a class whose fields we do not know) and ``source``
    the class it stands for, "module.Name". Fields read as attributes; ``asdict()`` maps them."""

    __slots__ = ()
    source: ClassVar[str] = ""
    _fields: ClassVar[tuple[str, ...] | None] = None

    def __new__(cls, *values: Any) -> Record:
        if cls._fields is not None and len(values) != len(cls._fields):
            raise DataError(f"{cls.source} has fields {cls._fields}, the pickle gives {len(values)} values")
        return super().__new__(cls, values)

    def __getattr__(self, name: str) -> Any:
        fields = type(self)._fields or ()
        if name in fields:
            return self[fields.index(name)]
        raise AttributeError(f"{type(self).source} has no field {name!r}")

    def asdict(self) -> dict[str, Any]:
        if self._fields is None:
            raise DataError(f"{self.source}: field names unknown")
        return dict(zip(self._fields, self))

    def __repr__(self) -> str:
        if self._fields is None:
            return f"{self.source}{tuple(self)!r}"
        return f"{self.source}({', '.join(f'{k}=...' for k in self._fields)})"


# NamedTuples of the release whose fields are known (a by-reference pickle does not list them).
KNOWN_RECORDS: dict[str, tuple[str, ...]] = {
    "byol.byol_experiment._ByolExperimentState": (
        "online_params", "target_params", "online_state", "target_state", "opt_state"),
    "byol.eval_experiment._EvalExperimentState": (
        "backbone_params", "classif_params", "backbone_state", "backbone_opt_state", "classif_opt_state"),
    "byol.utils.optimizers.ScaleByLarsState": ("mu",),
    "byol.utils.optimizers.AddWeightDecayState": (),
}
_RECORD_CLASSES: dict[tuple[str, tuple[str, ...] | None], type[Record]] = {}


def is_record_name(qualified: str) -> bool:
    """A NamedTuple the release's checkpoints hold: a known one, or an optimizer state (the LARS
    states of byol.utils.optimizers, optax's ``*State`` records of any version)."""
    module, _, name = qualified.rpartition(".")
    if qualified in KNOWN_RECORDS:
        return True
    optimizer_module = module == "byol.utils.optimizers" or module == "optax" or module.startswith("optax.")
    return optimizer_module and name.endswith("State") and name.isidentifier()


def record_class(qualified: str, fields: tuple[str, ...] | None = None) -> type[Record]:
    """The :class:`Record` stand-in for the NamedTuple ``qualified`` (cached: one class per name)."""
    if not is_record_name(qualified):
        raise RefusedPickle(f"refused {qualified}: not a record of a BYOL checkpoint, so the file was not "
                            "loaded (nothing in it was run)")
    known = KNOWN_RECORDS.get(qualified)
    if fields is not None:
        if not all(isinstance(f, str) and f.isidentifier() for f in fields):
            raise DataError(f"{qualified}: field names must be identifiers")
        if known is not None and tuple(fields) != known:
            raise DataError(f"{qualified} has fields {tuple(fields)}, expected {known}")
    fields = tuple(fields) if fields is not None else known
    key = (qualified, fields)
    if key not in _RECORD_CLASSES:
        name = qualified.rpartition(".")[2] or qualified
        _RECORD_CLASSES[key] = type(name, (Record,), {"__slots__": (), "source": qualified, "_fields": fields})
    return _RECORD_CLASSES[key]


def _require_numpy_reconstruct(fun: Any, what: str) -> None:
    if fun is not _NP_RECONSTRUCT:
        raise DataError(f"{what}: expected numpy's array reconstructor, got {fun!r}")


def _array_from_state(fun: Any, args: tuple, state: Any, what: str) -> np.ndarray:
    _require_numpy_reconstruct(fun, what)
    array = fun(*args)
    if type(array) is not np.ndarray:
        raise DataError(f"{what}: not a numpy array")
    array.__setstate__(state)
    return array


def _jax_array(fun: Any, args: tuple, arr_state: Any, aval_state: Any = None) -> np.ndarray:
    """A pickled jax array (``_reconstruct_array(fun, args, arr_state, aval_state)``) as the
    numpy array it holds; ``aval_state`` (weak_type, named_shape) only matters to jax."""
    return _array_from_state(fun, args, arr_state, "jax array")


def _dill_create_array(fun: Any, args: tuple, state: Any, npdict: Any = None) -> np.ndarray:
    if npdict:
        raise DataError("dill array with attributes (an ndarray subclass) is not a BYOL checkpoint's")
    return _array_from_state(fun, args, state, "dill array")


def _dill_create_namedtuple(name: Any, fieldnames: Any, modulename: Any, defaults: Any = None) -> type[Record]:
    """dill's by-value NamedTuple class: the :class:`Record` stand-in, never the class itself."""
    if not (isinstance(name, str) and isinstance(modulename, str) and isinstance(fieldnames, (tuple, list))):
        raise DataError("dill namedtuple: malformed class description")
    return record_class(f"{modulename}.{name}", tuple(fieldnames))


def _latin1_bytes(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode(str, "latin1")``: how a protocol-2 pickle stores ``bytes``; nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError("_codecs.encode is admitted only to restore bytes (latin-1 text)")
    return text.encode("latin1")


def _as_dict(mapping: Any = ()) -> dict:
    """haiku's FlatMapping / FlatMap / frozendict (its pre-2022 parameter trees) -> a plain dict."""
    return dict(mapping)


_BUILTIN_TYPES = {"NoneType": type(None), "TupleType": tuple, "ListType": list, "DictType": dict,
                  "tuple": tuple, "list": list, "dict": dict, "set": set, "frozenset": frozenset}


def _dill_load_type(name: Any) -> type:
    """dill's ``_load_type`` for builtin container types only."""
    if name not in _BUILTIN_TYPES:
        raise RefusedPickle(f"dill._dill._load_type({name!r}) (not a builtin container type)")
    return _BUILTIN_TYPES[name]


class _Callable:
    """One admitted function, as the pickle sees it: callable, and nothing else (no attributes to
    set, so a BUILD opcode aimed at it fails instead of altering our module's functions)."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise DataError(f"a pickle tried to set {name!r} on {self._name}")

    def __repr__(self) -> str:
        return f"<admitted {self._name}>"


def _admit(entries: dict[tuple[str, str], Any]) -> dict[tuple[str, str], Any]:
    """Wrap the Python functions (whose attributes a pickle could set) in :class:`_Callable`;
    classes and numpy's C functions are immutable as they are."""
    return {key: _Callable(v, ".".join(key)) if inspect.isfunction(v) else v for key, v in entries.items()}


_ADMITTED: dict[tuple[str, str], Any] = _admit({
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(m, "_reconstruct"): _NP_RECONSTRUCT for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _NP_SCALAR for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _NP_FROMBUFFER for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("jax._src.array", "_reconstruct_array"): _jax_array,
    ("jax._src.device_array", "reconstruct_device_array"): _jax_array,
    ("dill._dill", "_create_array"): _dill_create_array,
    ("dill._dill", "_create_namedtuple"): _dill_create_namedtuple,
    ("dill._dill", "_load_type"): _dill_load_type,
    **{("haiku._src.data_structures", n): _as_dict for n in ("FlatMapping", "FlatMap", "frozendict")},
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("collections", "OrderedDict"): collections.OrderedDict,
})


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg", "exceptions": "builtins"}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only the names of the module docstring
    (each mapped to our stand-in); anything else raises :class:`RefusedPickle` naming it."""

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)  # protocol 2 writes Python 2's module names
        admitted = _ADMITTED.get((module, name))
        if admitted is not None:
            return admitted
        qualified = f"{module}.{name}"
        if is_record_name(qualified):
            return record_class(qualified)
        raise RefusedPickle(f"refused {qualified}: a BYOL checkpoint never names it, so the file was not "
                            "loaded (nothing in it was run)")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def load_pickle(path: str | os.PathLike) -> Any:
    """Read the pickle at ``path`` with :class:`RestrictedUnpickler`. Every failure is a one-line
    DataError naming the file: missing, not a pickle, truncated, or refused (:class:`RefusedPickle`,
    naming the ``module.name``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise DataError(f"checkpoint is not a file: {path}")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except RefusedPickle as e:
        raise RefusedPickle(f"{path}: {e}") from None
    except DataError as e:
        raise DataError(f"{path} is not a BYOL checkpoint: {e}") from None
    except MemoryError:
        raise
    except Exception as e:  # a malformed stream: UnpicklingError, EOFError, ValueError, TypeError, ...
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError(f"{path} is not a readable pickle ({type(e).__name__}: {detail})") from None
