"""Python-side values for the AMF types that have no exact built-in counterpart.

Shared by the compiled AMF codec and its twin, so both return objects of the very same classes.
"""

from __future__ import annotations

from typing import NamedTuple


class Undefined:
    """AMF ``undefined`` (distinct from ``null``, which maps to ``None``)."""

    _instance: Undefined | None = None

    def __new__(cls) -> Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNDEFINED"

    def __reduce__(self):
        return (Undefined, ())


UNDEFINED = Undefined()


class ECMAArray(dict):
    """AMF0 ECMA array: an associative array, as ffmpeg and OBS send ``onMetaData``.

    Kept apart from a plain ``dict`` (AMF0 object) so re-encoding gives the same marker back.
    """

    def __repr__(self) -> str:
        return f"ECMAArray({dict.__repr__(self)})"


class TypedObject(dict):
    """AMF0 typed object / AMF3 object with a class name."""

    __slots__ = ("class_name",)

    def __init__(self, class_name: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.class_name = class_name

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TypedObject):
            return self.class_name == other.class_name and dict.__eq__(self, other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TypedObject({self.class_name!r}, {dict.__repr__(self)})"


class AMFDate(NamedTuple):
    """AMF date: milliseconds since the Unix epoch (a double) and the AMF0 time-zone field."""

    milliseconds: float
    timezone: int = 0


class XMLDocument(str):
    """AMF XML document (AMF0 0x0F, AMF3 0x07/0x0B), kept as its text."""

    def __repr__(self) -> str:
        return f"XMLDocument({str.__repr__(self)})"
