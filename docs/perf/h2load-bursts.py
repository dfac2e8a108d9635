#!/usr/bin/env python3
"""Bursts in an h2load --log-file (tab-separated: start in µs since the epoch, status,
duration in µs). Requests whose starts lie within GAP µs of the previous start form a burst
(h2load's paced clients start theirs together). Prints, over the bursts:

  size        requests per burst (p50 / p90)
  start-span  first to last start in a burst (p50)
  first-done  burst's first start to its first answer's end (p50)
  drain       burst's first start to its last answer's end (p50 / p90 / p99)
  end-span    first to last answer's end (p50)
  order       rank correlation of start order and end order, bursts of 10 or more
              (1: answered first come first served)
  first/last third  mean latency of the burst's earliest and latest thirds

usage: h2load-bursts.py LOG [LABEL]
"""
import statistics
import sys

GAP = 200


def q(xs, p):
    xs = sorted(xs)
    return xs[int(p * (len(xs) - 1))]


def main():
    label = sys.argv[2] if len(sys.argv) > 2 else sys.argv[1]
    rows = []
    with open(sys.argv[1]) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) == 3:
                rows.append((int(parts[0]), int(parts[2])))
    if not rows:
        sys.exit(f"{sys.argv[1]}: no requests")
    rows.sort()
    bursts, cur = [], [rows[0]]
    for r in rows[1:]:
        if r[0] - cur[-1][0] <= GAP:
            cur.append(r)
        else:
            bursts.append(cur)
            cur = [r]
    bursts.append(cur)

    durations = [d for _, d in rows]
    sizes = [len(b) for b in bursts]
    span = [b[-1][0] - b[0][0] for b in bursts]
    first = [min(s + d for s, d in b) - b[0][0] for b in bursts]
    drain = [max(s + d for s, d in b) - b[0][0] for b in bursts]
    end_span = [max(s + d for s, d in b) - min(s + d for s, d in b) for b in bursts]
    corr, early, late = [], [], []
    for b in bursts:
        n = len(b)
        if n < 10:
            continue
        ends = [s + d for s, d in b]
        rank = [0] * n
        for k, i in enumerate(sorted(range(n), key=lambda i: ends[i])):
            rank[i] = k
        m = (n - 1) / 2
        corr.append(
            sum((i - m) * (rank[i] - m) for i in range(n)) / sum((i - m) ** 2 for i in range(n))
        )
        third = n // 3
        early.append(statistics.mean(d for _, d in b[:third]))
        late.append(statistics.mean(d for _, d in b[-third:]))

    print(
        f"{label}: {len(rows)} requests, p50 {q(durations, .5)} µs, p99 {q(durations, .99)} µs; "
        f"{len(bursts)} bursts: size {q(sizes, .5)}/{q(sizes, .9)}, start-span {q(span, .5)} µs, "
        f"first-done {q(first, .5)} µs, drain {q(drain, .5)}/{q(drain, .9)}/{q(drain, .99)} µs, "
        f"end-span {q(end_span, .5)} µs"
    )
    if corr:
        print(
            f"{label}: {len(corr)} bursts of 10 or more: order {q(corr, .5):.2f}, "
            f"first third {statistics.mean(early):.0f} µs, last third {statistics.mean(late):.0f} µs"
        )


if __name__ == "__main__":
    main()
