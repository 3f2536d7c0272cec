#!/usr/bin/env python3
"""Lists Rust functions longer than a limit (default 120 lines), by brace matching.

Usage: scripts/long-functions.py [LIMIT] [PATH...]   (default: crates/)
Exit 1 when any function is over the limit. Strings, chars and comments are skipped
well enough for this code base.
"""
import os
import re
import sys

FN = re.compile(r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"C"\s+)?fn\s+(\w+)')


def strip(line, state):
    """Removes string/char literals and comments; `state` carries block comments."""
    out = []
    i = 0
    while i < len(line):
        if state["block"]:
            j = line.find("*/", i)
            if j < 0:
                return "".join(out)
            state["block"] = False
            i = j + 2
            continue
        c = line[i]
        if line.startswith("//", i):
            break
        if line.startswith("/*", i):
            state["block"] = True
            i += 2
            continue
        if c == '"':
            j = i + 1
            while j < len(line) and line[j] != '"':
                j += 2 if line[j] == "\\" else 1
            i = j + 1
            continue
        if c == "'" and i + 2 < len(line) and (line[i + 2] == "'" or line[i + 1] == "\\"):
            j = line.find("'", i + 2 if line[i + 1] != "\\" else i + 3)
            i = (j + 1) if j > 0 else i + 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def scan(path, limit):
    lines = open(path, encoding="utf-8", errors="replace").read().split("\n")
    state = {"block": False}
    clean = [strip(l, state) for l in lines]
    found = []
    for n, l in enumerate(lines):
        m = FN.match(l)
        if not m:
            continue
        depth, started = 0, False
        for k in range(n, len(clean)):
            for ch in clean[k]:
                if ch == "{":
                    depth += 1
                    started = True
                elif ch == "}":
                    depth -= 1
                elif ch == ";" and not started and depth == 0:
                    break
            else:
                if started and depth == 0:
                    length = k - n + 1
                    if length > limit:
                        found.append((length, path, n + 1, m.group(7)))
                    break
                continue
            break
    return found


def main():
    args = sys.argv[1:]
    limit = int(args.pop(0)) if args and args[0].isdigit() else 120
    roots = args or ["crates"]
    found = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            if "/target" in dirpath:
                continue
            for f in files:
                if f.endswith(".rs"):
                    found += scan(os.path.join(dirpath, f), limit)
    for length, path, line, name in sorted(found, reverse=True):
        print(f"{length:5} {path}:{line} {name}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
