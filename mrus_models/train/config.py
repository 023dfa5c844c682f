"""The training configuration every model shares, and typed ``key=value`` overrides.

A model's configuration subclasses :class:`TrainConfig` (dataclass inheritance) and sets
its paper's defaults; fields that change the network's shape (widths, dimension, channels)
are declared with :func:`arch_field`, so that resuming or loading a checkpoint into a
different architecture is refused with a clear message instead of a shape mismatch deep in
``load_state_dict``.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class MyConfig(TrainConfig):
    ...     widths: tuple[int, ...] = arch_field((16, 32))
    ...     lr: float = 3e-4
    >>> c = apply_overrides(MyConfig(), ["widths=8,16", "steps=10"])
    >>> c.widths, c.steps
    ((8, 16), 10)
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["TrainConfig", "apply_overrides", "arch_field", "architecture_diff", "fill_size",
           "check_pair_data", "check_unet_size"]

_ARCH = "architecture"


def arch_field(default: Any, **kwargs: Any) -> Any:
    """A dataclass field that defines the network's architecture.

    Two configurations that differ in such a field build networks whose weights do not fit
    each other: ``--resume`` and checkpoint loading refuse that (:func:`architecture_diff`).

    Args:
        default: the default value (immutable: use tuples, not lists).
        **kwargs: passed to :func:`dataclasses.field`.
    """
    metadata = dict(kwargs.pop("metadata", None) or {})
    metadata[_ARCH] = True
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class TrainConfig:
    """What the Trainer needs; a model's configuration adds its own fields.

    Change a configuration with :func:`apply_overrides` or :func:`dataclasses.replace`,
    both of which run :meth:`__post_init__`'s checks again (setting an attribute does not).
    A subclass that defines ``__post_init__`` calls ``super().__post_init__()``.

    Attributes:
        steps: optimiser steps of the whole run (the schedule's length).
        batch_size: items per optimiser step and process; under ``torchrun`` with N
            processes one step sees N × batch_size items.
        lr: peak learning rate (after warm-up).
        betas: Adam's (β1, β2).
        eps: Adam's ε.
        weight_decay: L2 penalty (``adam``) or decoupled decay (``adamw``).
        optimizer: ``"adam"`` or ``"adamw"`` (``torch.optim``).
        scheduler: learning-rate shape after warm-up: ``"constant"``, ``"linear"`` decay or
            ``"cosine"`` decay, both down to ``min_lr_ratio × lr`` at ``steps``.
        warmup_steps: linear warm-up from lr / (warmup_steps + 1) to lr.
        min_lr_ratio: final learning rate of the decaying schedules, as a fraction of lr.
        grad_clip: largest global gradient L2 norm; 0 turns clipping off.
        checkpoint_every: steps between checkpoints (one is always written at the end).
        val_every: steps between validations (0: only at the end).
        val_batches: validation batches (from the start of the ``val`` split, fixed order);
            0 turns validation off.
        log_every: steps per ``log.jsonl`` training line (the losses averaged over them).
        num_workers: DataLoader worker processes per training process.
        seed: seeds the network's initialisation, the data order and every RNG.
        amp: bf16 autocast of the training step on CUDA (always float32 on the CPU).
    """

    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw"] = "adam"
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0
    checkpoint_every: int = 500
    val_every: int = 0
    val_batches: int = 8
    log_every: int = 10
    num_workers: int = 0
    seed: int = 0
    amp: bool = True

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise TypeError(f"{type(self).__name__}.{f.name}: expected "
                                f"{_type_name(hints[f.name])}, got {value!r}")
        positive = ("steps", "batch_size", "checkpoint_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "val_every", "val_batches", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas}")
        for name in ("eps", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio}")

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-compatible values (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """The fields as an indented JSON object."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """The configuration from :meth:`to_dict`'s output; missing fields take defaults.

        Raises:
            ValueError: a key that is no field of ``cls``, or a value of the wrong type.
        """
        hints = _hints(cls)
        unknown = sorted(set(data) - set(hints))
        if unknown:
            raise ValueError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))}")
        kwargs = {}
        for key, value in data.items():
            try:
                kwargs[key] = _from_json_value(value, hints[key])
            except (TypeError, ValueError):
                raise ValueError(f"{cls.__name__}.{key}: expected {_type_name(hints[key])}, "
                                 f"got {value!r}") from None
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str):
        """The configuration from :meth:`to_json`'s output."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def architecture_fields(cls) -> tuple[str, ...]:
        """Names of the fields declared with :func:`arch_field`."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(_ARCH))


def fill_size(size: tuple[int, ...], default: tuple[int, ...]) -> tuple[int, ...]:
    """An item size from a configuration's ``size`` field: ``default`` when empty, one value
    repeated on every axis of ``default``, else the values given (one per axis)."""
    if not size:
        return tuple(default)
    if len(size) == 1:
        return (size[0],) * len(default)
    return tuple(size)


def check_pair_data(config: Any) -> None:
    """Checks a registration configuration's synthetic-pair data fields.

    Args:
        config: a configuration with ``max_displacement`` (mm) and ``train_items``.

    Raises:
        ValueError: ``max_displacement`` is negative or NaN; ``train_items`` is not None
            and not positive.
    """
    if not config.max_displacement >= 0:
        raise ValueError(f"max_displacement: expected a number >= 0 (mm), got "
                         f"{config.max_displacement}")
    if config.train_items is not None and config.train_items < 1:
        raise ValueError(f"train_items: expected a positive integer or None, got "
                         f"{config.train_items}")


def check_unet_size(config: Any, default_size: tuple[int, ...]) -> None:
    """Checks a U-Net registration configuration's ``size``, ``encoder`` and ``decoder``.

    Args:
        config: a configuration with ``ndim``, ``size``, ``encoder``, ``decoder`` and
            ``image_size`` (``size`` with the default filled in).
        default_size: the size an empty ``size`` stands for (named in the message).

    Raises:
        ValueError: ``size`` is not empty, one or ``ndim`` positive sizes; ``encoder`` is
            empty or ``decoder`` has no more widths than it; an image size is not divisible
            by the network's stride, ``2 ** len(encoder)``.
    """
    ndim = config.ndim
    if len(config.size) not in (0, 1, ndim) or any(s < 1 for s in config.size):
        raise ValueError(f"size: expected {ndim} positive sizes (or one, or none for the "
                         f"default {default_size}), got {config.size}")
    encoder, decoder = config.encoder, config.decoder
    if not encoder or len(decoder) <= len(encoder):
        raise ValueError(f"decoder: expected more widths than encoder's {len(encoder)} "
                         f"(and encoder not empty), got encoder {encoder} and decoder "
                         f"{decoder}")
    stride = 2 ** len(encoder)
    if any(s % stride for s in config.image_size):
        raise ValueError(f"size: every size must be divisible by 2 ** len(encoder) = "
                         f"{stride}, got {config.image_size}")


def architecture_diff(a: TrainConfig, b: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{field: (value in a, value in b)}`` for the architecture fields that differ."""
    names = set(type(a).architecture_fields()) | set(type(b).architecture_fields())
    out = {}
    for name in sorted(names):
        va, vb = getattr(a, name, None), getattr(b, name, None)
        if va != vb:
            out[name] = (va, vb)
    return out


def apply_overrides(config: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """A new configuration with ``key=value`` texts applied, each typed by its field.

    Values: ``int``, ``float`` (``1e-4``), ``bool`` (``true``/``false``/``1``/``0``/
    ``yes``/``no``), ``str``, a ``Literal`` choice, ``None`` for optional fields
    (``none``/``null``), tuples as comma-separated items (``16,32,32`` or ``[16, 32, 32]``).

    Args:
        config: the configuration to start from (unchanged).
        overrides: ``"key=value"`` texts, applied in order (a later one wins).

    Raises:
        ValueError: no ``=``, a key that is no field (the message lists the fields), a value
            that does not parse as the field's type, or a value the configuration rejects.
    """
    hints = _hints(type(config))
    changes: dict[str, Any] = {}
    for text in overrides:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {text!r}: expected key=value")
        if key not in hints:
            raise ValueError(f"--set {text}: unknown key {key!r}; {type(config).__name__} has "
                             f"{', '.join(sorted(hints))}")
        try:
            changes[key] = _parse(value.strip(), hints[key])
        except ValueError:
            raise ValueError(f"--set {text}: expected {_type_name(hints[key])} for {key!r}, "
                             f"got {value.strip()!r}") from None
    try:
        return dataclasses.replace(config, **changes)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--set {' '.join(overrides)}: {exc}") from None


# --------------------------------------------------------------------------- typing helpers


def _hints(cls) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if _is_union(tp):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"comma-separated {_type_name(args[0])}s"
        return f"{len(args)} comma-separated values ({', '.join(map(_type_name, args))})"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse(text: str, tp) -> Any:
    """``text`` as a value of type ``tp``; ValueError when it is none."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse(text, a)
            except ValueError:
                pass
        raise ValueError(text)
    if origin is Literal:
        for a in args:
            if text == str(a):
                return a
        raise ValueError(text)
    if origin is tuple:
        inner = text.strip()
        if inner[:1] in "[(" and inner[-1:] in "])":
            inner = inner[1:-1]
        items = [s.strip() for s in inner.split(",")] if inner.strip() else []
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse(s, args[0]) for s in items)
        if len(items) != len(args):
            raise ValueError(text)
        return tuple(_parse(s, a) for s, a in zip(items, args, strict=True))
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(text)
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    raise ValueError(f"fields of type {tp} cannot be set from text")


def _matches(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if _is_union(tp):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(
            _matches(v, a) for v, a in zip(value, args, strict=True))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _from_json_value(value, tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if value is None:
            return None
        for a in args:
            if a is not type(None):
                try:
                    out = _from_json_value(value, a)
                except (TypeError, ValueError):
                    continue
                if _matches(out, a):
                    return out
        raise ValueError(value)
    if origin is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json_value(v, args[0]) for v in value)
        if len(value) != len(args):
            raise ValueError(value)
        return tuple(_from_json_value(v, a) for v, a in zip(value, args, strict=True))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not _matches(value, tp):
        raise ValueError(value)
    return value
