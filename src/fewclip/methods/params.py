"""Declarative hyperparameters: each method states every hyperparameter once, its default beside its constraint.

A method is a keyword-only dataclass whose fields are built with :func:`param`::

    @register("linear-probe")
    @dataclass(kw_only=True, repr=False, eq=False)
    class LinearProbe(Method):
        C: float = param(1.0, Interval(Real, 0, None, closed="neither"), doc="inverse regularisation strength")
        normalize: bool = param(True, Boolean(), doc="L2-normalise the features first")

``Method.fit`` checks every value against its constraint before any work and raises a :class:`MethodError` that
names the method, the parameter, the value received and what is valid (scikit-learn's ``_parameter_constraints``
and ``validate_parameter_constraints``)::

    linear-probe: C=-1.0 is not valid; expected a finite real number > 0.

Every constraint can ``describe()`` itself and produce ``invalid_values()``: values that violate it, from which the
contract tests build one failing fit per value (scikit-learn's ``generate_invalid_param_val``). ``bool`` is never
accepted where a number is expected, and real numbers must be finite.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import Field, field
from numbers import Integral, Real
from typing import Any, Literal

from ..errors import MethodError

__all__ = [
    "Boolean",
    "Constraint",
    "Integral",
    "Interval",
    "Optional",
    "Options",
    "Real",
    "SequenceOf",
    "param",
    "validate",
]


class Constraint(ABC):
    """What values a hyperparameter accepts."""

    @abstractmethod
    def is_satisfied_by(self, value: Any) -> bool: ...

    @abstractmethod
    def describe(self, plural: bool = False) -> str:
        """The valid values in words, e.g. "a finite real number ≥ 0" (plural: "finite real numbers ≥ 0")."""

    @abstractmethod
    def invalid_values(self) -> list[Any]:
        """Values that violate the constraint (at least one)."""

    @abstractmethod
    def example(self) -> Any:
        """One valid value."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describe()}>"


def _number(x: float) -> str:
    return f"{x:g}"


class Interval(Constraint):
    """A real number (``Real``: finite; ints accepted) or an integer (``Integral``) within optional bounds.

    ``closed`` says which ends belong to the interval ("left", "right", "both", "neither"); ``None`` is an open end.
    """

    def __init__(
        self,
        kind: type[Real] | type[Integral],
        left: float | None,
        right: float | None,
        *,
        closed: Literal["left", "right", "both", "neither"],
    ):
        if kind not in (Real, Integral):
            raise TypeError(f"Interval kind must be numbers.Real or numbers.Integral, got {kind!r}")
        if closed not in ("left", "right", "both", "neither"):
            raise ValueError(f"closed={closed!r}; choose left, right, both or neither")
        if left is not None and right is not None and left > right:
            raise ValueError(f"empty interval: left {left} > right {right}")
        self.kind, self.left, self.right, self.closed = kind, left, right, closed

    @property
    def _left_closed(self) -> bool:
        return self.closed in ("left", "both")

    @property
    def _right_closed(self) -> bool:
        return self.closed in ("right", "both")

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return False
        if not math.isfinite(value):
            return False
        if self.left is not None and (value < self.left if self._left_closed else value <= self.left):
            return False
        if self.right is not None and (value > self.right if self._right_closed else value >= self.right):
            return False
        return True

    def describe(self, plural: bool = False) -> str:
        if self.kind is Integral:
            if self.right is None and self.left == 1 and self._left_closed:
                return "positive integers" if plural else "a positive integer"
            if self.right is None and self.left == 0 and self._left_closed:
                return "non-negative integers" if plural else "a non-negative integer"
            noun = "integers" if plural else "an integer"
        else:
            noun = "finite real numbers" if plural else "a finite real number"
        if self.left is not None and self.right is not None:
            lo = "[" if self._left_closed else "("
            hi = "]" if self._right_closed else ")"
            return f"{noun} in {lo}{_number(self.left)}, {_number(self.right)}{hi}"
        if self.left is not None:
            return f"{noun} {'≥' if self._left_closed else '>'} {_number(self.left)}"
        if self.right is not None:
            return f"{noun} {'≤' if self._right_closed else '<'} {_number(self.right)}"
        return noun

    def invalid_values(self) -> list[Any]:
        out: list[Any] = []
        if self.left is not None:
            out.append(self.left if not self._left_closed else self.left - 1)
        if self.right is not None:
            out.append(self.right if not self._right_closed else self.right + 1)
        if self.kind is Integral:
            out.append(self.example() + 0.5)  # not a whole number
        else:
            out += [float("nan"), float("inf")]
        return out + [True, "1"]

    def example(self) -> Any:
        if self.kind is Integral:
            if self.left is None:
                return 0 if self.right is None or self.right >= 0 else int(self.right) - 1
            return int(self.left) + (0 if self._left_closed else 1)
        if self.left is not None and self.right is not None:
            return (self.left + self.right) / 2
        if self.left is not None:
            return self.left + 1.0
        if self.right is not None:
            return self.right - 1.0
        return 0.0


class Options(Constraint):
    """One of a fixed set of values (of the options' own type: ``True`` is not the option ``1``)."""

    def __init__(self, values: tuple[Any, ...] | list[Any]):
        if not values:
            raise ValueError("Options needs at least one value")
        self.values = tuple(values)

    def is_satisfied_by(self, value: Any) -> bool:
        return any(type(value) is type(v) and value == v for v in self.values)

    def describe(self, plural: bool = False) -> str:
        return f"{'values among' if plural else 'one of'} {list(self.values)}"

    def invalid_values(self) -> list[Any]:
        return [f"not-{self.values[0]}", 0]

    def example(self) -> Any:
        return self.values[0]


class Boolean(Constraint):
    """``True`` or ``False`` (not 0 or 1)."""

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self, plural: bool = False) -> str:
        return "booleans" if plural else "True or False"

    def invalid_values(self) -> list[Any]:
        return ["yes", 1]

    def example(self) -> Any:
        return False


class SequenceOf(Constraint):
    """A list (or tuple) whose elements satisfy ``element``: exactly ``length`` of them, or at least ``min_length``."""

    def __init__(self, element: Constraint, *, length: int | None = None, min_length: int = 0):
        if length is not None and min_length:
            raise ValueError("give length or min_length, not both")
        self.element, self.length, self.min_length = element, length, min_length

    def is_satisfied_by(self, value: Any) -> bool:
        if not isinstance(value, list | tuple):
            return False
        if self.length is not None and len(value) != self.length:
            return False
        if len(value) < self.min_length:
            return False
        return all(self.element.is_satisfied_by(v) for v in value)

    def describe(self, plural: bool = False) -> str:
        items = self.element.describe(plural=True)
        if self.length is not None:
            what = f"list of {self.length} {items}"
        elif self.min_length == 1:
            what = f"non-empty list of {items}"
        elif self.min_length:
            what = f"list of at least {self.min_length} {items}"
        else:
            what = f"list of {items}"
        return what.replace("list", "lists", 1) if plural else f"a {what}"

    def invalid_values(self) -> list[Any]:
        size = self.length if self.length is not None else max(self.min_length, 1)
        fill = self.element.example()
        out: list[Any] = ["not a list"]
        if self.length is not None:
            out.append([fill] * (self.length + 1))
        elif self.min_length:
            out.append([fill] * (self.min_length - 1))
        out += [[bad] + [fill] * (size - 1) for bad in self.element.invalid_values()]
        return out

    def example(self) -> Any:
        return [self.element.example()] * (self.length if self.length is not None else max(self.min_length, 1))


class Optional(Constraint):
    """``None`` or a value satisfying ``constraint``."""

    def __init__(self, constraint: Constraint):
        self.constraint = constraint

    def is_satisfied_by(self, value: Any) -> bool:
        return value is None or self.constraint.is_satisfied_by(value)

    def describe(self, plural: bool = False) -> str:
        return f"None or {self.constraint.describe(plural)}"

    def invalid_values(self) -> list[Any]:
        return [v for v in self.constraint.invalid_values() if v is not None]

    def example(self) -> Any:
        return None


def param(default: Any, constraint: Constraint, *, doc: str = "", hint: str = "") -> Any:
    """A hyperparameter field: ``default``, its ``constraint``, a one-line ``doc`` and an optional ``hint`` appended to
    the error for an invalid value. The default must satisfy the constraint (checked when the class is defined)."""
    if not isinstance(constraint, Constraint):
        raise TypeError(f"constraint must be a Constraint, got {constraint!r}")
    if not constraint.is_satisfied_by(default):
        raise ValueError(f"default {default!r} does not satisfy its constraint ({constraint.describe()})")
    return field(default=default, metadata={"constraint": constraint, "doc": doc, "hint": hint})


def constraint_of(f: Field) -> Constraint | None:
    """The constraint a :func:`param` field carries (None for a plain dataclass field)."""
    return f.metadata.get("constraint")


def invalid_message(owner: str, name: str, value: Any, constraint: Constraint, hint: str = "") -> str:
    return f"{owner}: {name}={value!r} is not valid; expected {constraint.describe()}." + (f" {hint}" if hint else "")


def validate(owner: str, fields: Mapping[str, Field], values: Mapping[str, Any]) -> None:
    """Raise a :class:`MethodError` for the first value in ``values`` that its field's constraint refuses."""
    for name, value in values.items():
        f = fields[name]
        constraint = constraint_of(f)
        if constraint is not None and not constraint.is_satisfied_by(value):
            raise MethodError(invalid_message(owner, name, value, constraint, f.metadata.get("hint", "")))
