#!/usr/bin/env bash
# Size limits for production code (issue 24): no production .rs file over 1,000 lines and no
# function over 150 lines in gateway/src and registry/src. Lists every offender and exits 1 if
# there is one.
#
# What counts: a file's lines outside its `#[cfg(test)]` items (unit-test modules and test-only
# helpers are tests, not production code), and files named tests.rs (a unit-test module of its
# own); tests/ and benches/ are not scanned. A function runs
# from its `fn` line to the brace that closes its body, found by a brace-depth scan with string,
# character literals and comments blanked out (a simple scan, not a parser: good enough for
# rustfmt-formatted code). A nested function or closure counts inside its outer function.
# Also fails when production code outside gateway/src/{sim/,demo.rs,cli/} imports the simulator.
#
#   scripts/check-size.sh [DIR...]     default: gateway/src registry/src
#   MAX_FILE_LINES / MAX_FN_LINES      override the limits (1000 / 150)
set -euo pipefail
cd "$(dirname "$0")/.."

max_file="${MAX_FILE_LINES:-1000}"
max_fn="${MAX_FN_LINES:-150}"
[ $# -gt 0 ] || set -- gateway/src registry/src

scan=$(cat <<'PY'
import re
import sys

max_file, max_fn = int(sys.argv[1]), int(sys.argv[2])
paths = sys.argv[3:]

FN = re.compile(r'^\s*(pub(\([^)]*\))?\s+)?((const|async|unsafe|extern\s+"[^"]*")\s+)*fn\s+(\w+)')
CFG_TEST = re.compile(r'^\s*#\[cfg\(test\)\]')


def blank(lines):
    """The lines with comments, string and character literals replaced by spaces."""
    out = []
    in_block = 0
    raw_end = None  # closing delimiter of a raw string spanning lines
    in_str = False
    for line in lines:
        res = []
        i = 0
        n = len(line)
        while i < n:
            c = line[i]
            if in_block:
                if line.startswith('*/', i):
                    in_block -= 1
                    i += 2
                elif line.startswith('/*', i):
                    in_block += 1
                    i += 2
                else:
                    i += 1
                continue
            if raw_end is not None:
                j = line.find(raw_end, i)
                if j < 0:
                    i = n
                else:
                    i = j + len(raw_end)
                    raw_end = None
                continue
            if in_str:
                if c == '\\':
                    i += 2
                elif c == '"':
                    in_str = False
                    i += 1
                else:
                    i += 1
                continue
            if line.startswith('//', i):
                break
            if line.startswith('/*', i):
                in_block = 1
                i += 2
                continue
            m = re.match(r'b?r(#*)"', line[i:])
            if m and (i == 0 or not (line[i - 1].isalnum() or line[i - 1] == '_')):
                raw_end = '"' + m.group(1)
                i += len(m.group(0))
                continue
            if c == '"':
                in_str = True
                i += 1
                continue
            if c == "'":
                m = re.match(r"'(\\.[^']*|[^\\'])'", line[i:])
                if m:
                    i += len(m.group(0))
                    continue
            res.append(c)
            i += 1
        out.append(''.join(res))
    return out


def item_end(code, start):
    """The last line of the item (or `fn`) starting at `start`: where its body's braces close,
    or its `;` when it has no body."""
    depth = parens = 0
    opened = False
    for j in range(start, len(code)):
        for ch in code[j]:
            if ch == '{':
                depth += 1
                opened = True
            elif ch == '}':
                depth -= 1
            elif ch in '([':
                parens += 1
            elif ch in ')]':
                parens -= 1
            elif ch == ';' and not opened and depth == 0 and parens == 0:
                return j
        if opened and depth <= 0:
            return j
    return len(code) - 1


def production_lines(code):
    """Whether each line is outside `#[cfg(test)]` items."""
    keep = [True] * len(code)
    i = 0
    while i < len(code):
        if CFG_TEST.match(code[i]):
            end = item_end(code, i)
            for j in range(i, end + 1):
                keep[j] = False
            i = end + 1
        else:
            i += 1
    return keep


bad = 0
for path in paths:
    # a unit-test module in a file of its own (`#[cfg(test)] mod tests;`)
    if path.endswith('/tests.rs') or '/tests/' in path:
        continue
    with open(path, encoding='utf-8') as f:
        lines = f.read().split('\n')
    if lines and lines[-1] == '':
        lines.pop()
    code = blank(lines)
    keep = production_lines(code)
    counted = sum(keep)
    if counted > max_file:
        print(f'{path}: {counted} production lines (limit {max_file})')
        bad += 1
    i = 0
    while i < len(code):
        m = FN.match(code[i]) if keep[i] else None
        if not m:
            i += 1
            continue
        end = item_end(code, i)
        length = end - i + 1
        if length > max_fn:
            print(f'{path}:{i + 1}: fn {m.group(5)} is {length} lines (limit {max_fn})')
            bad += 1
        # continue inside the function too: nested fns are reported on their own as well
        i += 1

if bad:
    print(f'{bad} over the size limits', file=sys.stderr)
    sys.exit(1)
PY
)

status=0
# xargs may split the list over several runs; it exits 123 when any of them found an offender.
find "$@" -name '*.rs' -print0 | sort -z | xargs -0 python3 -c "$scan" "$max_file" "$max_fn" || status=1

# The simulator is not on the production path: only itself, the demo and the `yiqiao sim`
# subcommand import it (tests may too; they are not scanned here).
if sim=$(grep -rn --include='*.rs' -E 'crate::sim\b|use crate::sim|super::sim\b' gateway/src \
  | grep -v -E '^gateway/src/(sim/|demo\.rs|cli/)'); then
  echo "$sim" | sed 's/$/  (production code imports the simulator)/'
  status=1
fi
exit "$status"
