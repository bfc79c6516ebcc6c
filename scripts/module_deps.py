#!/usr/bin/env python3
"""Which top-level modules of src/ use which (`crate::<module>` references), and the cycles.

    python3 scripts/module_deps.py            # edges of library code, then cycles
    python3 scripts/module_deps.py --tests    # also count `#[cfg(test)]` code
    python3 scripts/module_deps.py --docs     # also count doc-comment links

A module is a file `src/<m>.rs` or a folder `src/<m>/`; `main.rs` and `lib.rs` are the top and
are left out. Comments are skipped unless --docs; code after a `#[cfg(test)]` line is skipped
unless --tests. Exit status 1 when there is a cycle (a strongly connected component of more
than one module, or a module that names itself through `crate::`, which is not counted).
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def modules():
    mods = {}
    for p in sorted(SRC.iterdir()):
        if p.is_dir():
            mods[p.name] = sorted(p.rglob("*.rs"))
        elif p.suffix == ".rs" and p.stem not in ("main", "lib"):
            mods[p.stem] = [p]
    return mods


def referenced(text, names):
    """Top-level module names after `crate::`, including grouped `use crate::{a, b::c}`."""
    found = set()
    for m in re.finditer(r"crate::(\{[^}]*\}|\w+)", text):
        body = m.group(1)
        if body.startswith("{"):
            for part in body[1:-1].split(","):
                head = part.strip().split("::")[0].strip()
                if head in names:
                    found.add(head)
        elif body in names:
            found.add(body)
    return found


def code_of(path, tests, docs):
    lines = []
    for line in path.read_text().splitlines():
        s = line.strip()
        if not tests and s.startswith("#[cfg(test)]"):
            break
        if not docs and s.startswith("//"):
            continue
        if not docs and "//" in line:
            line = line.split("//", 1)[0]
        lines.append(line)
    return "\n".join(lines)


def sccs(graph):
    """Tarjan's strongly connected components."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    tests = "--tests" in sys.argv
    docs = "--docs" in sys.argv
    mods = modules()
    names = set(mods)
    graph = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            graph[m] |= referenced(code_of(f, tests, docs), names) - {m}
    for m in sorted(graph):
        print(f"{m:12} -> {', '.join(sorted(graph[m])) or '(nothing)'}")
    cycles = [c for c in sccs(graph) if len(c) > 1]
    print()
    if not cycles:
        print("no cycles")
        return 0
    for comp in cycles:
        print(f"cycle among {{{', '.join(comp)}}}:")
        seen = set()
        for v in comp:
            loop = shortest_cycle(graph, v, set(comp))
            key = frozenset(zip(loop, loop[1:]))
            if key not in seen:
                seen.add(key)
                print("  " + " -> ".join(loop))
    return 1


def shortest_cycle(graph, start, inside):
    """The shortest path start -> ... -> start within `inside` (breadth first)."""
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if w in inside and w not in prev:
                prev[w] = v
                queue.append(w)
    return [start]


if __name__ == "__main__":
    sys.exit(main())
