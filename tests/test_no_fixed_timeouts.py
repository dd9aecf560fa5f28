"""No test depends on the speed of the machine: the only wall-clock limit is the backstop of `tests/waiting.py`.

A fixed limit (`timeout=120`, `time.monotonic() + 30`, `elapsed < 5`, playwright's `{ timeout: 30000 }`) fails a
correct run on a slow or busy machine; speed is measured in `tests/benchmarks/`, never asserted.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CLOCKS = {"monotonic", "perf_counter", "time", "monotonic_ns", "perf_counter_ns", "time_ns"}
ALLOWED = {TESTS / "waiting.py"}  # the backstop itself


def _is_number(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool)


def _is_clock_call(node: ast.AST) -> bool:
    """`time.monotonic()`, `perf_counter()` and friends."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in CLOCKS


def fixed_limits(source: str) -> list[tuple[int, str]]:
    """(line, what) for every wall-clock limit written as a number in Python test code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg and "timeout" in node.arg and _is_number(node.value):
            found.append((node.value.lineno, f"{node.arg}={node.value.value}"))
        elif isinstance(node, ast.arguments):
            named = [*node.posonlyargs, *node.args][-len(node.defaults):] if node.defaults else []
            pairs = [*zip(named, node.defaults, strict=True),
                     *((a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True) if d is not None)]
            found += [(d.lineno, f"parameter {a.arg}={d.value}") for a, d in pairs
                      if ("timeout" in a.arg or "deadline" in a.arg) and _is_number(d)]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub):
            if (_is_clock_call(node.left) and _is_number(node.right)) or (
                    _is_clock_call(node.right) and _is_number(node.left)):
                found.append((node.lineno, "a deadline of the clock plus a number"))
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.BinOp) and isinstance(node.left.op, ast.Sub):
            if _is_clock_call(node.left.left) and any(_is_number(c) for c in node.comparators):
                found.append((node.lineno, "an elapsed time compared with a number"))
    return found


JS_LIMIT = re.compile(r"timeout\s*:\s*\d|TIMEOUT_MS\s*\|\|\s*[1-9]|setTimeout\([^)]*,\s*\d{4,}|Date\.now\(\)\s*\+\s*\d")


def test_the_checker_sees_each_kind_of_fixed_limit():
    sources = ["subprocess.run(cmd, timeout=120)", "def wait(timeout: float = 30.0): pass",
               "deadline = time.monotonic() + 60", "assert time.monotonic() - started < 5",
               "proc.communicate(timeout=60)", "def wait(*, deadline_s=10): pass"]
    assert [len(fixed_limits(s)) for s in sources] == [1] * len(sources)
    assert fixed_limits("subprocess.run(cmd, timeout=BACKSTOP_S)\ntime.sleep(0.05)") == []
    assert JS_LIMIT.search("await page.waitForSelector(sel, { timeout: 30000 });")
    assert JS_LIMIT.search("const timeout = Number(process.env.TIMEOUT_MS || 180000);")
    assert not JS_LIMIT.search("await page.waitForSelector(sel, { timeout });")


def test_no_test_has_a_fixed_wall_clock_limit():
    problems = []
    for path in sorted(TESTS.rglob("*.py")):
        if path in ALLOWED or "node_modules" in path.parts:
            continue
        problems += [f"{path.relative_to(TESTS)}:{line}: {what}"
                     for line, what in fixed_limits(path.read_text(encoding="utf-8"))]
    for path in sorted([*TESTS.rglob("*.cjs"), *TESTS.rglob("*.js")]):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if JS_LIMIT.search(line):
                problems.append(f"{path.relative_to(TESTS)}:{number}: {line.strip()}")
    assert problems == [], "use tests/waiting.py (BACKSTOP_S, wait_until) instead:\n" + "\n".join(problems)
