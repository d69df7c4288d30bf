"""The values a filter compares a column with: checked against what every server takes.

A filter value comes from an untrusted container (a JSON search form, a query
string), so it is checked against the column's type here, before any SQL is
built, and refused with :class:`~sparc.sa.exceptions.InvalidFilterError` when
SQLite, PostgreSQL or MariaDB would refuse it, or when the driver could not
send it. The rules are those of the strictest supported server:

* integers fit the column's type: ``SmallInteger`` 16 bits, ``Integer``
  32 bits, ``BigInteger`` (and anything else) 64 bits, as on PostgreSQL;
* numbers are finite; on a ``Float`` column they fit a double; on a
  ``Numeric`` column they have at most :data:`MAX_DIGITS` digits and a
  magnitude between 1e-:data:`MAX_EXPONENT` and 1e+:data:`MAX_EXPONENT`
  (PostgreSQL's numeric refuses much larger or much smaller ones);
* strings hold no NUL character (PostgreSQL's text cannot) and no lone
  surrogate (no driver can encode it); a ``like`` pattern does not end in an
  unescaped backslash (PostgreSQL refuses it);
* a column whose values are structures (``JSON``, ``ARRAY``, ``Interval``,
  ``PickleType`` ...) only takes ``is null`` and ``is not null``.

A :class:`Budget` counts the bind parameters and the text a whole filter
sends, so that no filter within the documented limits exceeds PostgreSQL's
65,535 bind parameters, asyncpg's and SQLite's 32,766, or MariaDB's packet.
"""

from __future__ import annotations

import datetime
import decimal
import math
import re
import sys
import uuid
from typing import Any

import sqlalchemy as sa

from sparc.sa.exceptions import InvalidFilterError

__all__ = [
    "MAX_DIGITS",
    "MAX_EXPONENT",
    "MAX_FILTER_TEXT",
    "MAX_FILTER_VALUES",
    "Budget",
    "check_like_pattern",
    "check_text",
    "coerce",
    "column_type",
    "kind",
    "python_type",
]

#: A filter sends at most this many values (bind parameters) in all: an
#: ``in`` list counts each of its values, ``is null`` none, every other
#: condition one. PostgreSQL takes 65,535 parameters per statement, asyncpg
#: and SQLite (3.32 and later) 32,766; the rest is left to the query the
#: filter is part of.
MAX_FILTER_VALUES = 10_000
#: The strings, bytes and decimal numbers of a filter hold at most this many
#: characters (or bytes) in all, so that a statement stays far below
#: MariaDB's smallest ``max_allowed_packet`` (4 MiB) even when every
#: character takes four bytes.
MAX_FILTER_TEXT = 100_000
#: A number for a ``Numeric`` column has at most this many significant digits.
MAX_DIGITS = 1000
#: ... and, unless it is zero, a magnitude between 1e-MAX_EXPONENT and 1e+MAX_EXPONENT.
MAX_EXPONENT = 1000

_INTEGER_TEXT = re.compile(r"[+-]?\d{1,19}")
_NUMBER_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_FLOAT_MAX = sys.float_info.max
_SURROGATE = re.compile("[\ud800-\udfff]")


def kind(value: object) -> str:
    """'an int', 'a str', 'None': a value from a request, described by its type only."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def column_type(attribute: Any) -> Any:
    """The SQLAlchemy type of a mapped column attribute (a TypeDecorator's own type)."""
    type_ = attribute.property.columns[0].type
    if isinstance(type_, sa.types.TypeDecorator):
        return type_.impl_instance
    return type_


def python_type(attribute: Any) -> Any:
    """The Python type of a column's values, or None where its type names none."""
    try:
        return column_type(attribute).python_type
    except NotImplementedError:
        return None


def _integer_bits(type_: Any) -> int:
    if isinstance(type_, sa.SmallInteger):
        return 16
    if isinstance(type_, sa.BigInteger) or not isinstance(type_, sa.Integer):
        return 64
    return 32


class Budget:
    """The bind parameters and characters one filter has sent so far."""

    def __init__(
        self, max_values: int = MAX_FILTER_VALUES, max_text: int = MAX_FILTER_TEXT
    ) -> None:
        self.max_values = max_values
        self.max_text = max_text
        self.values = 0
        self.text = 0

    def charge(self, value: Any, path: str) -> None:
        """Count one value about to be sent; InvalidFilterError past a limit."""
        self.values += 1
        if self.values > self.max_values:
            raise InvalidFilterError(
                path, f"a filter sends at most {self.max_values} values in all"
            )
        if isinstance(value, (str, bytes)):
            self.text += len(value)
        elif isinstance(value, decimal.Decimal):
            self.text += len(value.as_tuple().digits)
        if self.text > self.max_text:
            raise InvalidFilterError(
                path,
                f"the strings and numbers of a filter hold at most {self.max_text} "
                "characters in all",
            )


def check_text(value: str, path: str) -> str:
    """``value``, if every server and driver takes it; InvalidFilterError if not."""
    if "\x00" in value:
        raise InvalidFilterError(path, "expected a string without NUL characters")
    if _SURROGATE.search(value):
        raise InvalidFilterError(
            path, "expected a string of Unicode characters, got a lone surrogate"
        )
    return value


def check_like_pattern(value: str, path: str) -> str:
    """A ``like`` pattern: a string that does not end in an unescaped backslash."""
    check_text(value, path)
    trailing = len(value) - len(value.rstrip("\\"))
    if trailing % 2:
        raise InvalidFilterError(
            path, "expected a pattern that does not end in an unescaped backslash"
        )
    return value


def _number(value: Any, path: str) -> decimal.Decimal | float | int:
    """An int, a float or a Decimal from a number or numeric text; InvalidFilterError if not."""
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
        if len(value) > MAX_DIGITS + 20:
            raise InvalidFilterError(path, f"expected a number of at most {MAX_DIGITS} digits")
        value = decimal.Decimal(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float, decimal.Decimal)):
        raise InvalidFilterError(path, f"expected a number, got {kind(value)}")
    if isinstance(value, decimal.Decimal):
        finite = value.is_finite()
    else:  # an int is finite, and may be too large for math.isfinite()
        finite = isinstance(value, int) or math.isfinite(value)
    if not finite:
        raise InvalidFilterError(path, "expected a finite number")
    return value


def _decimal(value: decimal.Decimal | float | int, path: str) -> decimal.Decimal:
    if isinstance(value, int) and value.bit_length() > MAX_DIGITS * 4:
        # not even converted to text: int -> str is quadratic, and limited
        raise InvalidFilterError(path, f"expected a number of at most {MAX_DIGITS} digits")
    number = decimal.Decimal(value) if isinstance(value, int) else decimal.Decimal(str(value))
    digits = number.as_tuple().digits
    if len(digits) > MAX_DIGITS:
        raise InvalidFilterError(path, f"expected a number of at most {MAX_DIGITS} digits")
    if number and not -MAX_EXPONENT <= number.adjusted() <= MAX_EXPONENT:
        raise InvalidFilterError(
            path,
            f"expected a number between 1e-{MAX_EXPONENT} and 1e+{MAX_EXPONENT} in magnitude, or 0",
        )
    return number


def _float(value: decimal.Decimal | float | int, path: str) -> float:
    try:
        number = float(value)
    except OverflowError:  # an int beyond a double
        number = math.inf
    if not math.isfinite(number):
        raise InvalidFilterError(
            path, f"expected a number between -{_FLOAT_MAX:.1e} and {_FLOAT_MAX:.1e}"
        )
    return number


def coerce(attribute: Any, value: Any, path: str) -> Any:
    """``value`` as the column ``attribute`` takes it on every server, or InvalidFilterError."""
    type_ = column_type(attribute)
    wanted = python_type(attribute)
    enums = getattr(type_, "enums", None)
    if enums:
        if getattr(type_, "enum_class", None) is not None and isinstance(value, type_.enum_class):
            return value
        if isinstance(value, str) and value in enums:
            return value
        raise InvalidFilterError(path, "expected one of " + ", ".join(map(repr, enums)))
    if wanted is bool:
        if isinstance(value, bool):
            return value
        raise InvalidFilterError(path, f"expected true or false, got {kind(value)}")
    if wanted is int:
        if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            bits = _integer_bits(type_)
            if -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
                return value
            raise InvalidFilterError(
                path, f"expected an integer that fits the column's {bits} bits"
            )
        raise InvalidFilterError(path, f"expected an integer, got {kind(value)}")
    if wanted is float:
        return _float(_number(value, path), path)
    if wanted is decimal.Decimal:
        number = _number(value, path)
        return _decimal(number, path)
    if wanted is str:
        if isinstance(value, str):
            return check_text(value, path)
        raise InvalidFilterError(path, f"expected a string, got {kind(value)}")
    for moment in (datetime.datetime, datetime.date, datetime.time):
        if wanted is moment:
            if type(value) is moment:
                return value
            if isinstance(value, str):
                try:
                    return moment.fromisoformat(value)
                except ValueError:
                    pass
            raise InvalidFilterError(path, f"expected an ISO 8601 {moment.__name__}")
    if wanted is uuid.UUID:
        if isinstance(value, uuid.UUID):
            return value
        if isinstance(value, str):
            try:
                return uuid.UUID(value)
            except ValueError:
                pass
        raise InvalidFilterError(path, "expected a UUID")
    if wanted is bytes:
        if isinstance(value, bytes):
            return value
        raise InvalidFilterError(path, f"expected bytes, got {kind(value)}")
    if wanted is not None or isinstance(type_, (sa.JSON, sa.ARRAY, sa.PickleType)):
        structured = isinstance(type_, (sa.JSON, sa.ARRAY, sa.PickleType)) or wanted is object
        name = type(type_).__name__ if structured else getattr(wanted, "__name__", "other")
        raise InvalidFilterError(
            path, f"a column of {name} values takes only 'is null' and 'is not null'"
        )
    # A type that names no Python type: plain scalars only, as safe as above.
    if isinstance(value, str):
        return check_text(value, path)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if -(2**63) <= value < 2**63:
            return value
        raise InvalidFilterError(path, "expected an integer that fits in 64 bits")
    if isinstance(value, float):
        return _float(_number(value, path), path)
    raise InvalidFilterError(path, f"expected a string, number or boolean, got {kind(value)}")
