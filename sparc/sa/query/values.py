"""The values a filter compares a column with: checked against what every server takes.

A filter value comes from an untrusted container (a JSON search form, a query
string), so it is checked against the column's type here, before any SQL is
built, and refused with :class:`~sparc.sa.exceptions.InvalidFilterError` when
SQLite, PostgreSQL or MariaDB would refuse it, or when the driver could not
send it. The rules are those of the strictest supported server:

* integers fit the column's type: ``SmallInteger`` 16 bits, ``Integer``
  32 bits, ``BigInteger`` (and anything else) 64 bits, as on PostgreSQL;
* numbers are finite, and written with an exponent of at most
  :data:`MAX_EXPONENT` either way (``'0e-20000000'`` included: zero is no
  exception, since drivers write out every digit of it); on a ``Float``
  column they fit a double (a single-precision float for ``REAL`` and
  ``Float(precision<=24)``, which PostgreSQL stores as ``real``); on a
  ``Numeric`` column they have at most :data:`MAX_DIGITS` digits and a
  magnitude between 1e-:data:`MAX_EXPONENT` and 1e+:data:`MAX_EXPONENT`
  (PostgreSQL's numeric refuses much larger or much smaller ones);
* on a ``Numeric(precision, scale)`` column, a number fits the column: at
  most ``scale`` digits after the point (trailing zeros aside) and at most
  ``precision - scale`` before it. asyncpg casts every value to the
  column's type, which rounds the extra digits away (changing what ``==``
  and ``<`` select) or overflows; the other drivers compare exactly. The
  one answer that is the same everywhere is to refuse such a number;
* a ``DateTime`` value is compared in UTC: an aware value on a naive
  column is converted to UTC and its time zone dropped (a naive column is
  taken to hold UTC, the SQLAlchemy convention), and on a
  ``DateTime(timezone=True)`` column a naive value is taken as UTC. asyncpg
  refuses to compare an aware value with a naive column and PyMySQL drops
  the offset unconverted; this is the one reading every driver can send.
  A ``Time`` value carries no time zone;
* strings hold no NUL character (PostgreSQL's text cannot) and no lone
  surrogate (no driver can encode it), and no more characters than the
  column's length where its type has one (asyncpg casts to
  ``VARCHAR(n)``, which truncates); a ``like`` pattern does not end in an
  unescaped backslash (PostgreSQL refuses it);
* a column whose values are structures (``JSON``, ``ARRAY``, ``Interval``,
  ``PickleType`` ...) only takes ``is null`` and ``is not null``.

A :class:`Budget` counts the bind parameters and the text a whole filter
sends, so that no filter within the documented limits exceeds PostgreSQL's
65,535 bind parameters, asyncpg's and SQLite's 32,766, or MariaDB's packet.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import math
import re
import sys
import uuid
from typing import Any, Final

import sqlalchemy as sa

from sparc.sa.exceptions import InvalidFilterError

__all__ = [
    "MAX_DIGITS",
    "MAX_EXPONENT",
    "MAX_FILTER_TEXT",
    "MAX_FILTER_VALUES",
    "Budget",
    "check_comparable",
    "check_length",
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
_NUMBER_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE]([+-]?\d+))?")
_FLOAT_MAX = sys.float_info.max
#: The largest and smallest positive single-precision floats (PostgreSQL's
#: ``real`` refuses values beyond either end).
_REAL_MAX = 3.4028234663852886e38
_REAL_MIN = 1.1754943508222875e-38
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
    if isinstance(value, str) and (match := _NUMBER_TEXT.fullmatch(value.strip())):
        if len(value) > MAX_DIGITS + 20:
            raise InvalidFilterError(path, f"expected a number of at most {MAX_DIGITS} digits")
        exponent = match.group(4)
        # Decimal() refuses an exponent beyond 10**18 with InvalidOperation,
        # and takes a smaller huge one: bound it here, before either happens.
        if exponent is not None and len(exponent.lstrip("+-").lstrip("0")) > 9:
            raise InvalidFilterError(path, _MAGNITUDE)
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


_MAGNITUDE = (
    f"expected a number between 1e-{MAX_EXPONENT} and 1e+{MAX_EXPONENT} in magnitude, "
    f"written with an exponent between -{MAX_EXPONENT} and {MAX_EXPONENT}"
)


def _decimal(value: decimal.Decimal | float | int, path: str) -> decimal.Decimal:
    if isinstance(value, int) and value.bit_length() > MAX_DIGITS * 4:
        # not even converted to text: int -> str is quadratic, and limited
        raise InvalidFilterError(path, f"expected a number of at most {MAX_DIGITS} digits")
    number = decimal.Decimal(value) if isinstance(value, int) else decimal.Decimal(str(value))
    _, digits, exponent = number.as_tuple()
    if len(digits) > MAX_DIGITS:
        raise InvalidFilterError(path, f"expected a number of at most {MAX_DIGITS} digits")
    # Zero too: 0e-20000000 is written out digit by digit by PyMySQL (20 MB)
    # and overflows PostgreSQL's numeric.
    assert isinstance(exponent, int)  # a finite number: _number() checked
    if not -MAX_EXPONENT <= number.adjusted() <= MAX_EXPONENT or not (
        -MAX_EXPONENT - MAX_DIGITS <= exponent <= MAX_EXPONENT
    ):
        raise InvalidFilterError(path, _MAGNITUDE)
    return number


def _fit_numeric(number: decimal.Decimal, type_: Any, path: str) -> decimal.Decimal:
    """``number``, if it fits a ``Numeric(precision, scale)`` column unrounded."""
    precision = getattr(type_, "precision", None)
    if precision is None:
        return number  # NUMERIC without a precision: the global limits only
    scale = getattr(type_, "scale", None) or 0
    _, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)
    significant = len(digits)
    while significant > 1 and digits[significant - 1] == 0 and exponent < 0:
        significant -= 1  # trailing zeros after the point: 12.500 is 12.5
        exponent += 1
    if not any(digits):
        return number
    if -exponent > scale:
        raise InvalidFilterError(
            path,
            f"expected a number with at most {scale} digits after the decimal point, "
            f"as the column's Numeric({precision}, {scale}) holds",
        )
    if number.adjusted() + 1 > precision - scale:
        raise InvalidFilterError(
            path,
            f"expected a number with at most {precision - scale} digits before the "
            f"decimal point, as the column's Numeric({precision}, {scale}) holds",
        )
    return number


def _single(type_: Any) -> bool:
    """True if the column's float is single precision (PostgreSQL's ``real``)."""
    if isinstance(type_, sa.REAL):
        return True
    precision = getattr(type_, "precision", None)
    return isinstance(precision, int) and precision <= 24


def _float(value: decimal.Decimal | float | int, path: str, single: bool = False) -> float:
    if isinstance(value, decimal.Decimal):
        _decimal(value, path)  # its exponent too: float('0e-99999999999') is fine, str() is not
    try:
        number = float(value)
    except OverflowError:  # an int beyond a double
        number = math.inf
    if not math.isfinite(number):
        raise InvalidFilterError(
            path, f"expected a number between -{_FLOAT_MAX:.1e} and {_FLOAT_MAX:.1e}"
        )
    if single and not (number == 0 or _REAL_MIN <= abs(number) <= _REAL_MAX):
        raise InvalidFilterError(
            path,
            f"expected 0 or a number between {_REAL_MIN:.2e} and {_REAL_MAX:.2e} in "
            "magnitude, as the column's single-precision float holds",
        )
    return number


def _moment(type_: Any, value: datetime.datetime, path: str) -> datetime.datetime:
    """A datetime as the column compares it: in UTC, aware only on an aware column."""
    aware = bool(getattr(type_, "timezone", False))
    naive = value.tzinfo is None or value.utcoffset() is None
    if naive and not aware:
        return value  # the common case: nothing to convert
    try:
        if naive:
            utc = value.replace(tzinfo=datetime.timezone.utc)
        else:
            utc = value.astimezone(datetime.timezone.utc)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before year 1 in UTC
        raise InvalidFilterError(
            path, "expected a datetime between years 1 and 9999 once converted to UTC"
        ) from None
    return utc if aware else utc.replace(tzinfo=None)


def _length(type_: Any) -> int | None:
    length = getattr(type_, "length", None)
    return length if isinstance(length, int) and isinstance(type_, sa.String) else None


def check_length(attribute: Any, value: str, path: str) -> str:
    """``value``, if the column's type has no length or the value fits it."""
    return _fit_length(column_type(attribute), value, path)


def _fit_length(type_: Any, value: str, path: str) -> str:
    length = _length(type_)
    if length is not None and len(value) > length:
        raise InvalidFilterError(
            path, f"expected at most {length} characters, as the column's String({length}) holds"
        )
    return value


def _coerce_moment(type_: Any, moment: type[Any], value: Any, path: str) -> Any:
    """:func:`coerce` for a date, time or datetime column (*moment*)."""
    found: Any = value if type(value) is moment else None
    if found is None and isinstance(value, str) and len(value) <= 64:
        if moment is datetime.datetime and value[-1:] in ("Z", "z"):
            # toISOString()'s UTC suffix: Python reads it only from 3.11 on
            value = value[:-1] + "+00:00"
        with contextlib.suppress(ValueError):
            found = moment.fromisoformat(value)
    if found is None:
        raise InvalidFilterError(path, f"expected an ISO 8601 {moment.__name__}")
    if moment is datetime.datetime:
        return _moment(type_, found, path)
    if moment is datetime.time and found.tzinfo is not None:
        raise InvalidFilterError(path, "expected a time without a time zone")
    return found


def _coerce_uuid(value: Any, path: str) -> Any:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise InvalidFilterError(path, "expected a UUID")


def _plain_scalar(value: Any, path: str) -> Any:
    """:func:`coerce` for a type that names no Python type: plain scalars
    only, as safe as the others."""
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
    if wanted in (float, decimal.Decimal) or isinstance(type_, sa.Numeric):
        number = _number(value, path)
        if isinstance(type_, sa.Float) or not isinstance(type_, sa.Numeric):
            checked = _float(number, path, _single(type_))
            return checked if wanted is float else _decimal(number, path)
        exact = _fit_numeric(_decimal(number, path), type_, path)
        return float(exact) if wanted is float else exact
    if wanted is str:
        if isinstance(value, str):
            return _fit_length(type_, check_text(value, path), path)
        raise InvalidFilterError(path, f"expected a string, got {kind(value)}")
    for moment in (datetime.datetime, datetime.date, datetime.time):
        if wanted is moment:
            return _coerce_moment(type_, moment, value, path)
    if wanted is uuid.UUID:
        return _coerce_uuid(value, path)
    if wanted is bytes:
        if isinstance(value, bytes):
            return value
        raise InvalidFilterError(path, f"expected bytes, got {kind(value)}")
    _refuse_uncomparable(type_, wanted, path)
    return _plain_scalar(value, path)


#: The Python types :func:`coerce` compares (any other, and structures, are refused).
_COMPARED: Final = (
    bool,
    int,
    float,
    decimal.Decimal,
    str,
    datetime.datetime,
    datetime.date,
    datetime.time,
    uuid.UUID,
    bytes,
)


def check_comparable(attribute: Any, path: str) -> None:
    """InvalidFilterError for a column whose values are not compared (JSON,
    ARRAY, pickled and other structures): what :func:`coerce` refuses for
    each value, for a list of none ("in" with an empty list)."""
    type_ = column_type(attribute)
    wanted = python_type(attribute)
    if getattr(type_, "enums", None) or isinstance(type_, sa.Numeric) or wanted in _COMPARED:
        return
    _refuse_uncomparable(type_, wanted, path)


def _refuse_uncomparable(type_: Any, wanted: Any, path: str) -> None:
    if wanted is not None or isinstance(type_, (sa.JSON, sa.ARRAY, sa.PickleType)):
        structured = isinstance(type_, (sa.JSON, sa.ARRAY, sa.PickleType)) or wanted is object
        name = type(type_).__name__ if structured else getattr(wanted, "__name__", "other")
        raise InvalidFilterError(
            path, f"a column of {name} values takes only 'is null' and 'is not null'"
        )
