"""IAM's decision for one request under a role's identity policies, small enough to read.

It follows AWS's evaluation logic for the identity-based policies of one principal (no SCPs,
permission boundaries, session or resource policies): a statement applies when its action,
resource and every condition match; an applying ``Deny`` wins over everything; otherwise an
applying ``Allow`` allows; otherwise the request is implicitly denied.

Conditions are judged against the request's context (``aws:RequestTag/Purpose``,
``ec2:MetadataHttpTokens``, ``kms:EncryptionContext:PARAMETER_ARN``, …) as IAM judges them:
operators AND together, keys within an operator AND together, the values of one key OR together;
a key missing from the context fails a condition, except under a negated operator, ``…IfExists``,
``ForAllValues:`` and ``Null``. A policy variable in a condition's value
(``${ec2:SourceInstanceARN}``) is the request's value of that key; a key the request lacks makes
the condition fail, whatever the operator, as IAM does. An operator it does not know is an error,
never a guess: a policy using one needs this evaluator taught first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Policy = Mapping[str, Any]
ContextValue = str | int | bool | Sequence[str]
Decision = Literal["allowed", "explicitly denied", "implicitly denied"]


@dataclass(frozen=True)
class Request:
    """One authorization: ``ec2:RunInstances`` on one resource ARN, with its context keys."""

    action: str
    resource: str
    context: Mapping[str, ContextValue] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    by: tuple[str, ...] = ()  # ``policy:Sid`` (or ``policy#n``) of the statements that decided

    @property
    def allowed(self) -> bool:
        return self.decision == "allowed"


def load_policy(path: Path) -> dict[str, Any]:
    policy: dict[str, Any] = json.loads(path.read_text())
    return policy


def evaluate(policies: Mapping[str, Policy], request: Request) -> Verdict:
    """IAM's decision on ``request`` for a principal holding every policy of ``policies``."""
    allows: list[str] = []
    denies: list[str] = []
    for name, policy in policies.items():
        for index, statement in enumerate(_statements(policy)):
            if applies(statement, request):
                label = f"{name}:{statement['Sid']}" if "Sid" in statement else f"{name}#{index}"
                (denies if statement["Effect"] == "Deny" else allows).append(label)
    if denies:
        return Verdict("explicitly denied", tuple(denies))
    if allows:
        return Verdict("allowed", tuple(allows))
    return Verdict("implicitly denied")


def applies(statement: Mapping[str, Any], request: Request) -> bool:
    if statement.get("Effect") not in ("Allow", "Deny"):
        raise ValueError(f"a statement's Effect is Allow or Deny: {statement}")
    if "Principal" in statement or "NotPrincipal" in statement:
        raise ValueError(f"an identity policy names no principal: {statement}")
    return (
        _matches_element(statement, "Action", request.action, case_sensitive=False)
        and _matches_element(statement, "Resource", request.resource, case_sensitive=True)
        and conditions_hold(statement.get("Condition", {}), request.context)
    )


def glob_matches(pattern: str, text: str, *, case_sensitive: bool = True) -> bool:
    """IAM's wildcards: ``*`` any run of characters (``/`` and ``:`` included), ``?`` one."""
    regex = "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern
    )
    flags = 0 if case_sensitive else re.IGNORECASE
    return re.fullmatch(regex, text, flags | re.DOTALL) is not None


def conditions_hold(block: Mapping[str, Mapping[str, Any]], context: Mapping[str, Any]) -> bool:
    """Every operator of a statement's ``Condition`` holds for ``context``."""
    present = {key.lower(): value for key, value in context.items()}
    for operator, keys in block.items():
        for key, wanted in keys.items():
            values = _substituted(_values(wanted), present)
            if values is None or not _operator_holds(operator, key.lower(), values, present):
                return False
    return True


_VARIABLE = re.compile(r"\$\{([^}]+)\}")


def _substituted(values: list[str], context: Mapping[str, ContextValue]) -> list[str] | None:
    """``values`` with each ``${key}`` replaced by the request's value; None when a key is
    missing (IAM then fails the condition)."""
    found: list[str] = []
    for value in values:
        missing = False

        def replace(match: re.Match[str]) -> str:
            nonlocal missing
            given = context.get(match.group(1).lower())
            if given is None or not isinstance(given, str):
                missing = True
                return ""
            return given

        text = _VARIABLE.sub(replace, value)
        if missing:
            return None
        found.append(text)
    return found


# --- the operators --------------------------------------------------------------------------


def _numeric(compare: Callable[[float, float], bool]) -> Callable[[str, str], bool]:
    def test(given: str, wanted: str) -> bool:
        return compare(float(given), float(wanted))

    return test


# Each operator as a test of one context value against one policy value, and whether it is the
# negation of another (then it holds when no policy value matches, or the key is missing).
_OPERATORS: dict[str, tuple[Callable[[str, str], bool], bool]] = {
    "StringEquals": (lambda given, wanted: given == wanted, False),
    "StringNotEquals": (lambda given, wanted: given == wanted, True),
    "StringEqualsIgnoreCase": (lambda given, wanted: given.lower() == wanted.lower(), False),
    "StringNotEqualsIgnoreCase": (lambda given, wanted: given.lower() == wanted.lower(), True),
    "StringLike": (lambda given, wanted: glob_matches(wanted, given), False),
    "StringNotLike": (lambda given, wanted: glob_matches(wanted, given), True),
    "ArnEquals": (lambda given, wanted: given == wanted, False),
    "ArnNotEquals": (lambda given, wanted: given == wanted, True),
    "ArnLike": (lambda given, wanted: glob_matches(wanted, given), False),
    "ArnNotLike": (lambda given, wanted: glob_matches(wanted, given), True),
    "NumericEquals": (_numeric(lambda given, wanted: given == wanted), False),
    "NumericNotEquals": (_numeric(lambda given, wanted: given == wanted), True),
    "NumericLessThan": (_numeric(lambda given, wanted: given < wanted), False),
    "NumericLessThanEquals": (_numeric(lambda given, wanted: given <= wanted), False),
    "NumericGreaterThan": (_numeric(lambda given, wanted: given > wanted), False),
    "NumericGreaterThanEquals": (_numeric(lambda given, wanted: given >= wanted), False),
    "Bool": (lambda given, wanted: given.lower() == wanted.lower(), False),
}


def _operator_holds(
    operator: str, key: str, wanted: list[str], context: Mapping[str, ContextValue]
) -> bool:
    if operator == "Null":
        [expect_missing] = wanted
        return (key not in context) == (expect_missing.lower() == "true")
    qualifier, _, name = operator.rpartition(":")
    if_exists = name.endswith("IfExists")
    name = name.removesuffix("IfExists")
    if name not in _OPERATORS or qualifier not in ("", "ForAllValues", "ForAnyValue"):
        raise ValueError(f"the evaluator does not know the condition operator {operator}")
    test, negated = _OPERATORS[name]
    if key not in context:
        return if_exists or negated or qualifier == "ForAllValues"
    given = context[key]
    if qualifier:
        members = _values(given)
        matched = [any(test(member, value) for value in wanted) for member in members]
        if negated:
            matched = [not m for m in matched]
        return all(matched) if qualifier == "ForAllValues" else any(matched)
    if not isinstance(given, str | int | bool):
        raise ValueError(f"{key} has many values: {operator} needs ForAllValues/ForAnyValue")
    [single] = _values(given)
    hit = any(test(single, value) for value in wanted)
    return not hit if negated else hit


# --- reading statements ---------------------------------------------------------------------


def _statements(policy: Policy) -> list[Mapping[str, Any]]:
    found = policy["Statement"]
    return [found] if isinstance(found, Mapping) else list(found)


def _values(value: Any) -> list[str]:
    """A policy's or a context's value(s) as IAM compares them: strings, ``true``/``false``."""
    items = value if isinstance(value, list | tuple) else [value]
    return [str(item).lower() if isinstance(item, bool) else str(item) for item in items]


def _matches_element(
    statement: Mapping[str, Any], element: str, text: str, *, case_sensitive: bool
) -> bool:
    """``Action``/``Resource`` (or their ``Not…``) of ``statement`` cover ``text``."""
    negated = f"Not{element}"
    if (element in statement) == (negated in statement):
        raise ValueError(f"a statement has exactly one of {element} and {negated}: {statement}")
    patterns: Iterable[str] = _values(statement.get(element, statement.get(negated)))
    hit = any(glob_matches(p, text, case_sensitive=case_sensitive) for p in patterns)
    return hit if element in statement else not hit
