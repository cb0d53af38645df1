"""Turns the results of bench/vs-litellm.sh into the section "## tally vs LiteLLM" of
docs/benchmarks.md: replaces what lies between the section's markers, appends the section when
the markers are missing, creates the file when it does not exist. Also prints the section.

    python3 report.py RESULTS.tsv docs/benchmarks.md
"""

import os
import sys

BEGIN = "<!-- vs-litellm:begin (written by bench/vs-litellm.sh; edits here are overwritten) -->"
END = "<!-- vs-litellm:end -->"


def load(path: str) -> dict:
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("\t")
            out[key] = value
    return out


def nums(value: str) -> list:
    return [float(x) if x.replace(".", "", 1).lstrip("-").isdigit() else x for x in value.split()]


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def ratio(a: float, b: float) -> str:
    """a / b, or a note when b is too small to divide by (noise around zero)."""
    if b <= 0.005:
        return "— (tally's difference is within noise)"
    return f"{a / b:,.0f}×" if a / b >= 10 else f"{a / b:,.1f}×"


def section(r: dict) -> str:
    duration, rate, load_secs, outage_secs, resend_n, lite_resend_n = nums(r["meta.params"])
    lat = {k[4:]: nums(v) for k, v in r.items() if k.startswith("lat.")}
    lines = []
    w = lines.append
    w("## tally vs LiteLLM")
    w("")
    took = int(float(r["meta.seconds"]))
    build = int(float(r.get("meta.build_seconds", "0")))
    took_text = f"{took} s" if not build else f"{took} s, of which {build} s building tally"
    w(f"Produced by `{r['meta.command']}` on {r['meta.date']} in {took_text}. "
      f"Machine: {r['meta.machine']}; load average at the end of the run {r['meta.load']}. "
      f"Versions: LiteLLM {r['meta.litellm']} (`litellm[proxy]` from PyPI, Python {r['meta.python']}, "
      f"its defaults: one uvicorn worker), tally {r['meta.tally']} (release build), {r['meta.wrk']}.")
    w("")
    w("Both proxies read **the same config.yaml** (`bench/vs-litellm/config.yaml.in`: one `openai/gpt-4o` "
      "deployment, `callbacks: [\"lago\"]`, a generated master key), call the same fixed-answer upstream "
      "(`bench/proxy_upstream.rs`) on loopback, and bill a Lago emulator (`tally lago-emulator`) of their "
      "own, with `LAGO_API_CHARGE_BY=end_user_id` and the request body's `user`. LiteLLM's virtual keys "
      "need a Postgres database and the Prisma client (`pip install prisma`, then `prisma generate`, which "
      "downloads Prisma's engine binaries from outside the package registries: not possible on this "
      "offline machine), so both proxies are called with the master key, which LiteLLM accepts without a "
      "database. tally bills through `tally ship` with its default settings.")
    w("")
    w("**Absolute numbers are noisy**: the 2-core machine is shared with other engineers' builds while "
      "this runs. Compare the ratios and differences, which come from runs made back to back in one go "
      "against the same upstream; rerun the script to see the spread. On this machine the p99 of every "
      "path, the upstream called directly included, is dominated by scheduling noise, so a small or "
      "negative p99 difference for tally means it is within that noise.")
    w("")
    w(f"### Latency and throughput (wrk, {int(duration)} s per run, same request body)")
    w("")
    w("| connections | path | requests/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |")
    w("|---:|---|---:|---:|---:|---:|---:|---:|")
    names = {"direct": "upstream directly", "tally": "through tally proxy", "litellm": "through LiteLLM"}
    for conns in ("1", "64"):
        d = lat[f"direct.{conns}"]
        for target in ("direct", "tally", "litellm"):
            rps, p50, p99, errors = lat[f"{target}.{conns}"]
            added = ("", "") if target == "direct" else (fmt(p50 - d[1], 3), fmt(p99 - d[2], 3))
            w(f"| {conns} | {names[target]} | {fmt(rps, 0)} | {fmt(p50, 3)} | {fmt(p99, 3)} | "
              f"{added[0]} | {added[1]} | {int(errors)} |")
    w("")
    w("| | tally | LiteLLM | LiteLLM ÷ tally |")
    w("|---|---:|---:|---:|")
    for conns in ("1", "64"):
        d, t, l = lat[f"direct.{conns}"], lat[f"tally.{conns}"], lat[f"litellm.{conns}"]
        for i, name in ((1, "p50"), (2, "p99")):
            ta, la = t[i] - d[i], l[i] - d[i]
            w(f"| added latency {name}, {conns} connection{'s' if conns != '1' else ''} (ms) | "
              f"{fmt(ta, 3)} | {fmt(la, 3)} | {ratio(la, ta)} |")
    t64, l64 = lat["tally.64"][0], lat["litellm.64"][0]
    w(f"| throughput, 64 connections (requests/s) | {fmt(t64, 0)} | {fmt(l64, 0)} | "
      f"tally serves {t64 / l64:,.0f}× as many |")
    rss = {k[4:]: [v / 1024 for v in nums(x)] for k, x in r.items() if k.startswith("rss.")}
    tp, ts, li = rss["tally_proxy"], rss["tally_ship"], rss["litellm"]
    w(f"| RSS after the load, MiB (peak) | proxy {fmt(tp[0], 0)} ({fmt(tp[1], 0)}) + ship {fmt(ts[0], 0)} "
      f"({fmt(ts[1], 0)}) | {fmt(li[0], 0)} ({fmt(li[1], 0)}) | {li[0] / (tp[0] + ts[0]):,.1f}× |")
    w("")

    w("### Billing")
    w("")
    st, sl = nums(r["steady.tally"]), nums(r["steady.litellm"])
    w("| | tally | LiteLLM |")
    w("|---|---|---|")
    w(f"| steady load above: completions served → events at Lago | {int(st[0]):,} → {int(st[1]):,} | "
      f"{int(sl[0]) + int(sl[3]):,} ({int(sl[0]):,} answered to wrk + {int(sl[3])} in flight when it "
      f"stopped) → {int(sl[1]):,} |")
    w(f"| HTTP requests to Lago per event | {st[2] / st[1]:.3f} ({int(st[2]):,} requests) | "
      f"{sl[2] / sl[1]:.3f} ({int(sl[2]):,} requests) |")
    for kind, label in (("503", "answers 503"), ("refused", "refuses connections")):
        cells = []
        for proxy in ("tally", "litellm"):
            ok, stored, failed, _requests = nums(r[f"outage.{proxy}.{kind}"])
            lost = ok - stored
            cell = (f"{int(ok)} completed, {int(stored)} billed, **{int(lost)} lost** "
                    f"({100 * lost / ok:.0f} %)" if ok else "no completions")
            if kind == "503":
                cell += f"; {int(failed)} Lago requests answered 503"
            cells.append(cell)
        w(f"| Lago {label} for {int(outage_secs)} s in the middle of {int(load_secs)} s at "
          f"{int(rate)} requests/s | {cells[0]} | {cells[1]} |")
    rt = nums(r["resend.tally"])
    n, stored, distinct, dups, _req, replay = rt
    rc, rp = nums(r["resend.litellm.clickhouse"]), nums(r["resend.litellm.postgres"])
    replay_cell = "failed (see the run's output)" if replay == "failed" else f"{int(replay)} requests to Lago"
    w(f"| resend: events billed twice | **{int(stored - distinct)}** of {int(n)} "
      f"({int(dups)} resends reached Lago and merged) | **{int(rc[1] - rc[0])}** of {int(rc[0])} on "
      f"ClickHouse-mode Lago, **{int(rp[1] - rp[0])}** of {int(rp[0])} on Postgres-mode |")
    w(f"| the whole log replayed again (`tally replay --ship`) | {replay_cell} | no equivalent |")
    tt, tl = nums(r["timestamp.tally"]), nums(r["timestamp.litellm"])
    w(f"| events that carry their own timestamp | {int(tt[1])} of {int(tt[0])} (the latest arrived "
      f"{tt[2] / 1000:.1f} s after its completion, still stamped with it) | {int(tl[1])} of {int(tl[0])} "
      f"(event fields: {', '.join('`' + f + '`' for f in r['litellm.event_fields'].split())}) |")
    w("")
    w("How each row is measured:")
    w("")
    w("- *Added latency*: the proxy's p50/p99 minus the upstream's own, from wrk runs of "
      f"{int(duration)} s made one after the other at 1 and at 64 connections. LiteLLM bills from an "
      "in-process callback while it serves; tally's proxy only appends to the spend log, and `tally ship` "
      "(a separate process, in the RSS column) ships it during the same runs.")
    w("- *Steady load*: the completions of the latency runs and warm-ups (tally: spend-log records; "
      "LiteLLM: wrk's successful answers plus the one request per connection still in flight when wrk "
      "stops, which LiteLLM serves and bills too) against the events the proxy's Lago holds once "
      "delivery has settled; HTTP requests per event from the emulator's counters.")
    w(f"- *Outage*: `bench/vs-litellm/load.py` sends {int(rate)} requests/s for {int(load_secs)} s "
      f"to one proxy at a time; after {(load_secs - outage_secs) / 2:g} s the emulator answers every Lago "
      f"request with 503 (fault `server_error`), or stops listening (`refuse_connections`), for "
      f"{int(outage_secs)} s. Lost = completions answered 200 minus events stored, counted after "
      "LiteLLM's callbacks have gone quiet and after `tally ship` (default retry settings) has caught up. "
      f"LiteLLM loses the events of the completions that end during the outage ({int(rate)} requests/s × "
      f"{int(outage_secs)} s): its callback sends each once and logs the failure.")
    w(f"- *Resend*: tally: `tally ship` ships {int(n) // 2} records, its state directory is backed up, "
      f"{int(n) // 2} more records are shipped, then the older backup is restored and the shipper "
      "restarted, so it sends the second half again; the emulator also drops its answer to two requests "
      "after storing them (the shipper resends those). The emulator runs in ClickHouse mode (always 200, "
      "merges only identical `transaction_id` + `timestamp`), so every resend that is not byte-identical "
      "would show as a second event. Billed twice = events stored minus distinct transaction ids. "
      f"LiteLLM's proxy never resends (that is the loss above); recovering a lost event means sending "
      f"it again, so `bench/vs-litellm/litellm_resend.py` drives LiteLLM's own `LagoLogger` for "
      f"{int(rc[0])} completions while the emulator stores each first attempt and drops the answer, and "
      "sends each failed call once more: every attempt gets a fresh random `transaction_id`, so the "
      "resend is a new event for either store (billed twice = events stored minus completions).")
    w("- *Timestamp*: the events stored during the two outage runs. tally: the event's timestamp equals "
      "the spend-log record's `end_time`. LiteLLM: its event has no `timestamp` field (fields listed from "
      "the event its `LagoLogger` builds), so Lago stamps the time of receipt; an event delayed past the "
      "end of a billing period lands in the next one.")
    return "\n".join(lines) + "\n"


def main() -> None:
    results, doc = sys.argv[1], sys.argv[2]
    body = f"{BEGIN}\n{section(load(results))}{END}\n"
    text = open(doc).read() if os.path.exists(doc) else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + body.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + body
    with open(doc, "w") as f:
        f.write(text)
    sys.stdout.write(body)


if __name__ == "__main__":
    main()
