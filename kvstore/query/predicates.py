"""`where` predicates compiled into plain closures, evaluated on every scanned row. Pure.

Semantics (docs/query.md repeats them for users):
- A predicate on a field is false when the field is missing, whatever the operator, except
  `exists` with value false. All predicates must hold (AND).
- `==` is JSON equality: numbers by value (1 == 1.0), booleans are not numbers (true != 1),
  arrays and objects element by element. `!=` is its negation among rows having the field.
- `<`, `<=`, `>`, `>=` compare numbers with numbers and strings with strings (by code point,
  which is also key order); any other pairing is false, never an error.
- `in` holds when the field equals (as `==`) one of the listed scalars; `prefix` when the field is
  a string starting with the given one; `exists` when the field is present (any value, null too).
- `$key` names the row's key, a string.
- A stored value that is not JSON fails every predicate on a field (`exists: false` included):
  only predicates on `$key` can match it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.query.documents import (
    KEY_FIELD,
    MISSING,
    NOT_JSON,
    json_equal,
    make_getter,
    split_field,
)
from kvstore.query.spec import Op, Predicate

ValueTest = Callable[[Any], bool]  # (field value or MISSING) -> bool
KeyTest = Callable[[str], bool]
DocumentTest = Callable[[Any], bool]  # (a JSON document, never NOT_JSON) -> bool


@dataclass(frozen=True, slots=True)
class CompiledWhere:
    """Call it as where(key, document). key_test runs first so a shard can skip decoding rows
    whose key already fails; document_test is None when no predicate reads a field."""

    key_test: KeyTest | None
    document_test: DocumentTest | None

    def __call__(self, key: str, document: Any) -> bool:
        if self.key_test is not None and not self.key_test(key):
            return False
        if self.document_test is None:
            return True
        return document is not NOT_JSON and self.document_test(document)


def _is_number(value: Any) -> bool:
    kind = type(value)
    return kind is int or kind is float


def _equal_test(literal: Any) -> ValueTest:
    kind = type(literal)
    if kind is str:
        return lambda value: value == literal  # a str only ever equals a str
    if kind is int or kind is float:
        return lambda value: (type(value) is int or type(value) is float) and value == literal
    if kind is bool or literal is None:
        return lambda value: value is literal
    return lambda value: value is not MISSING and json_equal(value, literal)


def _ordering_test(op: Op, literal: Any) -> ValueTest:
    if type(literal) is str:
        if op is Op.LT:
            return lambda value: type(value) is str and value < literal
        if op is Op.LE:
            return lambda value: type(value) is str and value <= literal
        if op is Op.GT:
            return lambda value: type(value) is str and value > literal
        return lambda value: type(value) is str and value >= literal
    if op is Op.LT:
        return lambda value: (type(value) is int or type(value) is float) and value < literal
    if op is Op.LE:
        return lambda value: (type(value) is int or type(value) is float) and value <= literal
    if op is Op.GT:
        return lambda value: (type(value) is int or type(value) is float) and value > literal
    return lambda value: (type(value) is int or type(value) is float) and value >= literal


def _in_test(literals: Sequence[Any]) -> ValueTest:
    strings = frozenset(item for item in literals if type(item) is str)
    numbers = frozenset(item for item in literals if _is_number(item))
    singletons = tuple(item for item in literals if type(item) is bool or item is None)
    if not numbers and not singletons:
        return lambda value: type(value) is str and value in strings

    def test(value: Any) -> bool:
        kind = type(value)
        if kind is str:
            return value in strings
        if kind is int or kind is float:
            return value in numbers
        return any(value is item for item in singletons)

    return test


def value_test(op: Op, literal: Any) -> ValueTest:
    """The test one predicate applies to the value its field holds (or MISSING)."""
    if op is Op.EQ:
        return _equal_test(literal)
    if op is Op.NE:
        equal = _equal_test(literal)
        return lambda value: value is not MISSING and not equal(value)
    if op is Op.IN:
        return _in_test(literal)
    if op is Op.EXISTS:
        if literal:
            return lambda value: value is not MISSING
        return lambda value: value is MISSING
    if op is Op.PREFIX:
        return lambda value: type(value) is str and value.startswith(literal)
    return _ordering_test(op, literal)


def _document_test(predicate: Predicate) -> DocumentTest:
    test = value_test(predicate.op, predicate.value)
    segments = split_field(predicate.field)
    if len(segments) == 1 and not segments[0].isdigit():
        name = segments[0]
        return lambda document: test(
            document.get(name, MISSING) if type(document) is dict else MISSING
        )
    getter = make_getter(predicate.field)
    return lambda document: test(getter("", document))


def _all_of(tests: list[Callable[[Any], bool]]) -> Callable[[Any], bool] | None:
    if not tests:
        return None
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:
        first, second = tests
        return lambda item: first(item) and second(item)
    frozen = tuple(tests)
    return lambda item: all(test(item) for test in frozen)


def compile_where(predicates: Sequence[Predicate]) -> CompiledWhere:
    key_tests: list[Callable[[Any], bool]] = []
    document_tests: list[Callable[[Any], bool]] = []
    for predicate in predicates:
        if predicate.field == KEY_FIELD:
            key_tests.append(value_test(predicate.op, predicate.value))
        else:
            document_tests.append(_document_test(predicate))
    return CompiledWhere(_all_of(key_tests), _all_of(document_tests))


__all__ = ["CompiledWhere", "compile_where", "value_test"]
