"""A small LSST-style Task layer: :class:`Task`, :class:`Struct`, :func:`timeMethod` and config overrides.

It mirrors ``lsst.pipe.base.Task`` closely enough for LSST users (``ConfigClass``, ``_DefaultName``,
``makeSubtask``, ``log``, ``metadata``, ``run`` returning a ``Struct``) without depending on pipe_base.
Configs are ``lsst.pex.config`` configs; subtasks are retargeted through ``ConfigurableField`` and
``RegistryField`` as in the LSST stack.
"""

from __future__ import annotations

import ast
import functools
import logging
import time
from collections.abc import Iterable
from typing import Any

import lsst.pex.config as pexConfig

from ..errors import ConfigError

__all__ = ["Task", "Struct", "timeMethod", "apply_config_overrides", "parse_override_value", "TaskMetadata"]


class Struct:
    """A simple attribute container, like ``lsst.pipe.base.Struct``."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def getDict(self) -> dict[str, Any]:
        """The fields as a dict (LSST name)."""
        return dict(self.__dict__)

    def mergeItems(self, struct: "Struct", *names: str) -> None:
        for name in names:
            setattr(self, name, getattr(struct, name))

    def __contains__(self, name: str) -> bool:
        return name in self.__dict__

    def __repr__(self) -> str:
        return "Struct(" + ", ".join(f"{k}={type(v).__name__}" for k, v in self.__dict__.items()) + ")"


class TaskMetadata(dict):
    """Task metadata: a dict of scalars, lists and nested ``TaskMetadata`` of subtasks."""

    def to_plain(self) -> dict:
        """Nested plain-Python copy (JSON-serialisable where the values are)."""
        out = {}
        for k, v in self.items():
            out[k] = v.to_plain() if isinstance(v, TaskMetadata) else v
        return out


def timeMethod(func):
    """Decorator recording the wall and CPU time of a Task method in ``self.metadata`` (``<name>StartWall`` …)."""

    @functools.wraps(func)
    def wrapper(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return func(self, *args, **kwargs)
        finally:
            md = getattr(self, "metadata", None)
            if md is not None:
                md[f"{func.__name__}WallTime"] = time.perf_counter() - t0
                md[f"{func.__name__}CpuTime"] = time.process_time() - c0

    return wrapper


class Task:
    """Base class of diffim tasks.

    Parameters
    ----------
    config
        Instance of ``ConfigClass`` (default: a new default config). The config is frozen.
    name
        Task name (default ``_DefaultName``).
    parentTask
        Parent task, for subtasks; the full name is ``parent.name``.
    log
        Logger (default: ``logging.getLogger("diffim." + fullName)``).
    """

    ConfigClass: type[pexConfig.Config] = pexConfig.Config
    _DefaultName: str = "task"

    def __init__(self, config: pexConfig.Config | None = None, *, name: str | None = None,
                 parentTask: "Task | None" = None, log: logging.Logger | None = None, **kwargs: Any) -> None:
        if config is None:
            config = self.ConfigClass()
        if not isinstance(config, self.ConfigClass):
            raise ConfigError(
                f"{type(self).__name__} needs a {self.ConfigClass.__name__}, got {type(config).__name__}."
            )
        self.config = config
        self._name = name if name is not None else self._DefaultName
        self._parentTask = parentTask
        self._fullName = f"{parentTask.getFullName()}.{self._name}" if parentTask is not None else self._name
        if log is None:
            log = logging.getLogger(
                f"{parentTask.log.name}.{self._name}" if parentTask is not None else f"diffim.{self._name}"
            )
        self.log = log
        self.metadata = TaskMetadata()
        self._subtasks: dict[str, Task] = {}
        if parentTask is not None:
            parentTask.metadata[self._name] = self.metadata

    def getName(self) -> str:
        return self._name

    def getFullName(self) -> str:
        return self._fullName

    def getFullMetadata(self) -> TaskMetadata:
        return self.metadata

    def makeSubtask(self, name: str, **kwargs: Any) -> "Task":
        """Construct the subtask configured by the ``ConfigurableField``/``RegistryField`` ``name``."""
        field = getattr(self.config, name)
        task = field.apply(name=name, parentTask=self, **kwargs)
        setattr(self, name, task)
        self._subtasks[name] = task
        return task

    def emptyMetadata(self) -> None:
        self.metadata.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._fullName!r})"


# ----------------------------------------------------------------------------------------------------------
# Overrides, as pipetask's -c key=value and -C file
# ----------------------------------------------------------------------------------------------------------
def parse_override_value(text: str) -> Any:
    """Parse the value of a ``key=value`` override: a Python literal if it is one, else the plain string."""
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        return text


def _resolve(config: pexConfig.Config, dotted: str):
    parts = dotted.split(".")
    obj = config
    for i, part in enumerate(parts[:-1]):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            try:  # a registry or choice key: subtract.al.kernel.AL.spatialKernelOrder
                obj = obj[part]
            except Exception:  # pex_config raises its own errors for unknown registry keys
                raise ConfigError(
                    f"Unknown config field {'.'.join(parts[: i + 1])!r} in override {dotted!r}."
                ) from None
    return obj, parts[-1]


def apply_config_overrides(
    config: pexConfig.Config,
    overrides: Iterable[str] = (),
    files: Iterable[str] = (),
) -> pexConfig.Config:
    """Apply override files (``-C``, Python that assigns to ``config``) then ``key=value`` strings (``-c``).

    Keys are dotted field paths (``detection.thresholdValue=5.5``, ``subtract.name=zogy``). A leading task
    label (``imageDifference:doDecorrelation=False``) is accepted and ignored, as pipetask users write it.
    Raises :class:`~diffim.errors.ConfigError` naming the key for unknown fields or bad values.
    """
    for path in files:
        try:
            config.load(str(path))
        except FileNotFoundError:
            raise ConfigError(f"Config override file {path!r} does not exist.") from None
        except Exception as exc:  # a broken override file is a user error, not a crash
            raise ConfigError(f"Could not apply config override file {path!r}: {exc}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Config override {item!r} is not of the form key=value.")
        key, value = item.split("=", 1)
        key = key.strip()
        if ":" in key:
            key = key.split(":", 1)[1]
        obj, attr = _resolve(config, key)
        if not hasattr(obj, attr) and attr not in getattr(obj, "_fields", {}):
            raise ConfigError(f"Unknown config field {key!r}.")
        parsed = parse_override_value(value)
        field = getattr(obj, "_fields", {}).get(attr)
        if isinstance(field, pexConfig.ListField) and not isinstance(parsed, (list, tuple)):
            # pex_config would turn a bare string into a list of its characters (BAD → ['B', 'A', 'D']):
            # read "BAD,SAT" or "BAD" as a comma-separated list, a lone number as a one-element list.
            if isinstance(parsed, str):
                parsed = [parse_override_value(v) for v in parsed.split(",") if v.strip()]
            else:
                parsed = [parsed]
        try:
            setattr(obj, attr, parsed)
        except Exception as exc:
            try:  # a string field given something that looked like a literal: retry as text
                if isinstance(field, pexConfig.ListField):
                    raise TypeError
                setattr(obj, attr, value.strip())
            except Exception:
                raise ConfigError(f"Bad value for config field {key!r}: {value!r} ({short_config_message(exc)}).") from None
    return config


def short_config_message(exc: Exception) -> str:
    """The message of a pex_config error without its "For more information see the Field definition at"
    trailer (a file path and line of pex_config's own source, noise to a command-line user)."""
    text = str(exc).split("For more information", 1)[0]
    return " ".join(text.split())
