# usage: footprint.py CALLGRIND_OUT N [TOP]
# The code a request runs: from a callgrind profile taken with --dump-instr=yes over N
# requests, the distinct instructions executed at least N times (once per request or more)
# and the 64-byte lines they occupy, in total and for the TOP functions with the most lines.
import collections
import re
import sys


def parse(path):
    """Instruction address -> (executions, function name)."""
    counts = collections.Counter()
    owner = {}
    names = {}
    fn = None
    addr = 0
    after_call = False
    for line in open(path):
        line = line.rstrip("\n")
        if not line:
            continue
        m = re.match(r"(c?fn)=\((\d+)\)(?: (.*))?", line)
        if m:
            if m.group(3):
                names[m.group(2)] = m.group(3)
            if m.group(1) == "fn":
                fn = names.get(m.group(2))
            continue
        if line.startswith("calls="):
            # The next cost line is the call's inclusive cost, not this instruction's.
            after_call = True
            continue
        if line[0] not in "0123456789+-*":
            continue
        parts = line.split()
        pos = parts[0]
        if pos.startswith("0x"):
            addr = int(pos, 16)
        elif pos[0] == "+":
            addr += int(pos[1:])
        elif pos[0] == "-":
            addr -= int(pos[1:])
        if after_call:
            after_call = False
            continue
        counts[addr] += int(parts[-1])
        owner[addr] = fn
    return counts, owner


def main():
    path, n = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    counts, owner = parse(path)
    lines = collections.defaultdict(set)
    instrs = collections.Counter()
    for addr, count in counts.items():
        if count >= n:
            name = re.sub(r"::h[0-9a-f]{16}$", "", owner[addr] or "?")
            lines[name].add(addr // 64)
            instrs[name] += 1
    all_lines = set().union(*lines.values()) if lines else set()
    print(f"{sum(instrs.values())} instructions on {len(all_lines)} lines run per request")
    for name, held in sorted(lines.items(), key=lambda kv: -len(kv[1]))[:top]:
        print(f"{len(held):5d} lines {instrs[name]:6d} instructions  {name[:120]}")


main()
