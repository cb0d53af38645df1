"""Reads wrk's --latency output (argv[1]); prints "rps p50_ms p99_ms ok errors".

ok: responses with a 2xx status; errors: other statuses plus socket errors and timeouts.
"""

import re
import sys

out = sys.argv[1]


def ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
total = int(re.search(r"(\d+) requests in", out).group(1))
m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
non2xx = int(m.group(1)) if m else 0
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
socket_errors = sum(map(int, m.groups())) if m else 0
print(f"{rps:.1f} {p50:.3f} {p99:.3f} {total - non2xx} {non2xx + socket_errors}")
