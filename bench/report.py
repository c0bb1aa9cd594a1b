"""Turn per-round results into medians, ratios, goal checks and a noise figure; write Markdown and a chart."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .analysis import median, spread
from .targets import KEYLESS_TARGETS


def _isnan(v: float) -> bool:
    """NaN marks a figure that was not measured."""
    return v != v  # noqa: PLR0124


@dataclass(frozen=True)
class Figure:
    key: str
    phase: str
    field: str
    label: str
    unit: str
    minus_direct: bool = False  # "added": the target's value minus direct's in the same round
    proxies_only: bool = False  # meaningless for direct (CPU and memory of a proxy process)
    higher_is_better: bool = False


FIGURES = [
    Figure("latency_p50", "paced", "latency_p50_us", "added latency/token p50", "us", minus_direct=True),
    Figure("latency_p99", "paced", "latency_p99_us", "added latency/token p99", "us", minus_direct=True),
    Figure("cpu_token_paced", "paced", "cpu_per_token_us", "CPU/token paced", "us", proxies_only=True),
    Figure("cpu_token_full", "full_speed", "cpu_per_token_us", "CPU/token full speed", "us",
           proxies_only=True),
    Figure("tokens_per_s", "full_speed", "tokens_per_s", "tokens/s full speed", "/s", higher_is_better=True),
    Figure("requests_per_s", "small", "requests_per_s", "small requests/s", "/s", higher_is_better=True),
    Figure("request_p99", "small", "p99_us", "small request p99", "us"),
    Figure("cpu_request", "small", "cpu_per_request_us", "CPU/request", "us", proxies_only=True),
    Figure("ttfb_p50", "ttfb", "p50_us", "TTFB p50", "us"),
    Figure("ttfb_p99", "ttfb", "p99_us", "TTFB p99", "us"),
    Figure("ttfb_added", "ttfb", "p50_us", "added TTFB p50", "us", minus_direct=True),
    Figure("mem_idle", "mem_idle", "per_idle_conn_kib", "memory/idle conn", "KiB", proxies_only=True),
    Figure("mem_active", "mem_active", "per_active_stream_kib", "memory/active stream", "KiB",
           proxies_only=True),
    Figure("client_cpu_request", "small", "client_cpu_per_request_us", "load generator CPU/request", "us"),
]
LIVE_LEVELS = (100, 200, 400)
for _n in LIVE_LEVELS:
    FIGURES += [
        Figure(f"live{_n}_p50", f"live{_n}", "latency_p50_us", f"{_n} live streams: added p50", "us",
               minus_direct=True),
        Figure(f"live{_n}_p99", f"live{_n}", "latency_p99_us", f"{_n} live streams: added p99", "us",
               minus_direct=True),
        Figure(f"live{_n}_p999", f"live{_n}", "latency_p999_us", f"{_n} live streams: added p99.9", "us",
               minus_direct=True),
        Figure(f"live{_n}_cpu", f"live{_n}", "cpu_per_token_us", f"{_n} live streams: CPU/token", "us",
               proxies_only=True),
        Figure(f"live{_n}_client", f"live{_n}", "client_cpu_util", f"{_n} live streams: client CPU use", "CPUs"),
    ]
FIG = {f.key: f for f in FIGURES}
# The figures whose round-to-round movement makes up the run's noise figure.
NOISE_FIGURES = ("latency_p50", "cpu_token_paced", "cpu_token_full", "cpu_request", "ttfb_p50")
# The figures compared round by round between an extra target and its base (targets.PAIRED_BASE).
PAIRED_FIGURES = ("cpu_token_paced", "cpu_token_full", "cpu_request", "latency_p50", "latency_p99", "ttfb_added",
                  "ttfb_p50", "ttfb_p99", "requests_per_s", "client_cpu_request", "live200_p50", "live200_p99",
                  "live200_cpu")
# The first of the candidates that ran is the base.
PAIRED_BASE = {"fastgate-limited": ("fastgate",), "fastgate-3backends": ("fastgate",),
               "fastgate-workers1": ("fastgate",), "fastgate-workers2": ("fastgate-workers1", "fastgate"),
               "fastgate-redis": ("fastgate-limited",), "floor": ("nginx",)}

# A goal is judged from the per-round values of its comparison (fastgate/nginx in each round, measured
# seconds apart), never from the ratio of the medians: the median of those, and their spread (min-max).
# "met": the whole spread is on the good side of the line; "missed": the whole spread is beyond it;
# "within noise": the spread crosses it. Fewer than MIN_JUDGED_ROUNDS rounds: shown, but not judged.
MIN_JUDGED_ROUNDS = 7


@dataclass(frozen=True)
class Goal:
    figure: str
    kind: str  # "ratio": target/base <= limit; "ratio_min": >= limit; "plus": target - base <= limit (us);
    #            "abs": target's own value < limit; "report": no line, the figures only
    limit: float
    text: str
    issue: str
    target: str = "fastgate"
    base: str = "nginx"


GOALS = [
    Goal("cpu_request", "ratio", 5.0, "CPU per small request <= 5x nginx", "11"),
    Goal("ttfb_p50", "ratio", 1.25, "TTFB p50 (one-token stream) <= 1.25x nginx", "11"),
    Goal("cpu_token_paced", "ratio", 1.25, "CPU/token paced <= 1.25x nginx", "11"),
    Goal("live200_p50", "ratio", 2.0, "200 live streams: added latency p50 <= 2x nginx", "11"),
    Goal("live200_p99", "ratio", 1.5, "200 live streams: added latency p99 <= 1.5x nginx", "11"),
    Goal("requests_per_s", "ratio_min", 0.4, "small requests/s >= 0.4x nginx (1 worker)", "11"),
    Goal("cpu_token_full", "ratio", 2.0, "CPU/token full speed <= 2x nginx", "2"),
    Goal("latency_p50", "plus", 20.0, "added latency/token p50 <= nginx + 20 us", "2"),
    Goal("mem_idle", "abs", 20.0, "memory/idle keep-alive conn < 20 KiB", "2"),
    Goal("mem_active", "abs", 64.0, "memory/active stream < 64 KiB", "2"),
    # issue 9: three backends against one, same run
    Goal("cpu_token_paced", "ratio", 1.05, "3 backends: CPU/token paced within 5% of 1 backend", "9",
         "fastgate-3backends", "fastgate"),
    Goal("cpu_token_full", "ratio", 1.05, "3 backends: CPU/token full speed within 5% of 1 backend", "9",
         "fastgate-3backends", "fastgate"),
    Goal("latency_p50", "ratio", 1.05, "3 backends: added latency/token p50 within 5% of 1 backend", "9",
         "fastgate-3backends", "fastgate"),
    Goal("latency_p99", "ratio", 1.05, "3 backends: added latency/token p99 within 5% of 1 backend", "9",
         "fastgate-3backends", "fastgate"),
    # issue 10: admission through Redis against in-process limits (the same managed key), and workers
    Goal("ttfb_p50", "plus", 150.0, "Redis admission adds <= 150 us p50 per request (TTFB p50)", "10",
         "fastgate-redis", "fastgate-limited"),
    Goal("ttfb_p99", "report_plus", math.nan, "Redis admission: TTFB p99 added", "10",
         "fastgate-redis", "fastgate-limited"),
    # against workers = 1 with the same [state] when fastgate-workers1 ran, else against plain fastgate
    Goal("requests_per_s", "report", math.nan, "workers = 2: small requests/s, ratio to workers = 1", "10",
         "fastgate-workers2", "fastgate-workers1|fastgate"),
    Goal("cpu_request", "report", math.nan, "workers = 2: CPU/request (all processes), ratio to 1", "10",
         "fastgate-workers2", "fastgate-workers1|fastgate"),
    Goal("client_cpu_request", "report", math.nan, "workers = 2: load generator CPU/request, ratio", "10",
         "fastgate-workers2", "fastgate-workers1|fastgate"),
    # issue 11: how far the design card itself (bench/floor.py) is from nginx, and fastgate from it
    Goal("cpu_request", "report", math.nan, "design floor: CPU per small request, ratio to nginx", "11",
         "floor", "nginx"),
    Goal("ttfb_p50", "report", math.nan, "design floor: TTFB p50, ratio to nginx", "11", "floor", "nginx"),
    Goal("cpu_token_paced", "report", math.nan, "design floor: CPU/token paced, ratio to nginx", "11",
         "floor", "nginx"),
    Goal("cpu_request", "report", math.nan, "fastgate vs design floor: CPU per small request", "11",
         "fastgate", "floor"),
    Goal("ttfb_p50", "report", math.nan, "fastgate vs design floor: TTFB p50", "11", "fastgate", "floor"),
]


def _value(results: dict[str, Any], fig: Figure) -> float:
    phase = results.get(fig.phase) or {}
    v = phase.get(fig.field)
    return float(v) if isinstance(v, (int, float)) else math.nan


def per_round(rounds: list[dict[str, Any]], names: list[str], fig: Figure, *, raw: bool = False
              ) -> dict[str, list[float]]:
    """The figure per round for each target; `raw`: without subtracting direct's value."""
    out: dict[str, list[float]] = {n: [] for n in names}
    for rnd in rounds:
        res = rnd["results"]
        direct = _value(res.get("direct", {}), fig) if fig.minus_direct and not raw else 0.0
        for n in names:
            if fig.proxies_only and n == "direct":
                continue
            v = _value(res.get(n, {}), fig)
            if fig.minus_direct and not raw:
                v = v - direct
            out[n].append(v)
    return out


def build(env: dict[str, Any], names: list[str], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for fig in FIGURES:
        pr = per_round(rounds, names, fig)
        # An "added" figure can be near zero, which makes its relative spread meaningless: the noise of
        # those is the spread of the measured value itself (before direct's is subtracted).
        raw = per_round(rounds, names, fig, raw=True) if fig.minus_direct else pr
        figures[fig.key] = {
            "label": fig.label, "unit": fig.unit,
            "median": {n: median(v) for n, v in pr.items() if v},
            "median_raw": {n: median(v) for n, v in raw.items() if v},  # before direct's is subtracted
            "spread": {n: spread(v) for n, v in raw.items() if v},
            "rounds": pr,
        }
    ratios: dict[str, Any] = {}
    for base in ratio_bases(names):
        if base not in names:
            continue
        for fig in FIGURES:
            med = figures[fig.key]["median"]
            b = med.get(base, math.nan)
            for n in names:
                if n == base or n not in med:
                    continue
                ratios.setdefault(f"vs_{base}", {}).setdefault(fig.key, {})[n] = _ratio(med[n], b)
    # per-round ratios fastgate/nginx: how stable is the comparison itself?
    ratio_spread: dict[str, float] = {}
    if "fastgate" in names and "nginx" in names:
        for key in NOISE_FIGURES:
            pr = figures[key]["rounds"]
            rr = [_ratio(a, b) for a, b in zip(pr.get("fastgate", []), pr.get("nginx", []), strict=False)]
            ratio_spread[key] = spread(rr)
    # Each extra target against its base, round by round (measured seconds apart in the same round): the
    # median of the per-round ratios and their spread, next to the ratio of the medians.
    paired: dict[str, Any] = {}
    for name in names:
        kind, _, variant = name.partition(":")
        bases = [b + (f":{variant}" if variant else "") for b in PAIRED_BASE.get(kind, ())]
        bases = [b for b in bases if b in names]
        if not bases:
            continue
        base = bases[0]
        for key in PAIRED_FIGURES:
            pr = figures[key]["rounds"]
            rr = [_ratio(a, b) for a, b in zip(pr.get(name, []), pr.get(base, []), strict=False)]
            if all(_isnan(x) for x in rr):
                continue
            paired.setdefault(f"{name}/{base}", {})[key] = {
                "rounds": rr, "median": median(rr), "spread": spread(rr), **_minmax(rr),
                "ratio_of_medians": _ratio(figures[key]["median"].get(name, math.nan),
                                           figures[key]["median"].get(base, math.nan))}
    others = [r.get("others_cpus") for rnd in rounds for res in rnd["results"].values() for r in res.values()
              if isinstance(r, dict) and isinstance(r.get("others_cpus"), float)
              and not _isnan(r["others_cpus"])]
    noise_values = [s for key in NOISE_FIGURES for n, s in figures[key]["spread"].items() if not _isnan(s)]
    noise = {
        "median_spread": median(noise_values),
        "max_spread": max(noise_values) if noise_values else math.nan,
        "fastgate_over_nginx_ratio_spread": ratio_spread,
        "direct_latency_p50_us_rounds": [
            _value(r["results"].get("direct", {}), FIG["latency_p50"]) for r in rounds],
        "calibration_ms_rounds": [r["calibration_ms"] for r in rounds],
        "calibration_spread": spread([r["calibration_ms"] for r in rounds]),
        "others_cpus_median": median(others),
        "others_cpus_max": max(others) if others else math.nan,
        "steal_pct": env.get("system", {}).get("steal_pct", math.nan),
        "busy_pct": env.get("system", {}).get("busy_pct", math.nan),
    }
    return {
        "environment": env,
        "targets": names,
        "figures": figures,
        "ratios": ratios,
        "paired_ratios": paired,
        "goals": goals(figures, names),
        "correctness": correctness(rounds, names),
        "noise": noise,
        "harness_cost": harness_cost(rounds, names),
        "rounds": [_strip_samples(r) for r in rounds],
    }


def _strip_samples(rnd: dict[str, Any]) -> dict[str, Any]:
    out = dict(rnd)
    out["results"] = {n: {ph: {k: v for k, v in res.items() if not k.endswith("_sample")}
                          if isinstance(res, dict) else res for ph, res in phases.items()}
                      for n, phases in rnd["results"].items()}
    return out


def ratio_bases(names: list[str]) -> list[str]:
    """The targets other targets are divided by: nginx and the seed, and fastgate when a
    fastgate-limited target ran beside it."""
    bases = [b for b in ("nginx", "seed") if b in names]
    if "fastgate" in names and any(n.partition(":")[0] in PAIRED_BASE for n in names):
        bases.append("fastgate")
    return bases


def _ratio(a: float, b: float) -> float:
    """a / b; undefined when the base is not positive (an "added" figure at or below direct's)."""
    if _isnan(a) or _isnan(b) or b <= 0:
        return math.nan
    return a / b


def _minmax(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if not _isnan(v)]
    return {"min": min(vals) if vals else math.nan, "max": max(vals) if vals else math.nan}


def verdict(values: list[float], limit: float, *, at_least: bool = False) -> str:
    """"met" when every round is on the good side of `limit`, "missed" when every round is beyond it,
    "within noise" when the rounds fall on both sides; "not measured" without a single value."""
    vals = [v for v in values if not _isnan(v)]
    if not vals or _isnan(limit):
        return "not measured" if not vals else "reported"
    lo, hi = min(vals), max(vals)
    if at_least:
        good, bad = lo >= limit, hi < limit
    else:
        good, bad = hi <= limit, lo > limit
    return "met" if good else "missed" if bad else "within noise"


def goals(figures: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    """Every goal whose targets ran, judged from its per-round values (see GOALS)."""
    out = []
    for goal in GOALS:
        # "a|b": the first of these that ran
        base = next((b for b in goal.base.split("|") if b in names), goal.base.split("|")[0])
        g = replace(goal, base=base)
        if g.target not in names or (g.kind != "abs" and g.base not in names):
            continue
        pr = figures[g.figure]["rounds"]
        mine = pr.get(g.target, [])
        other = pr.get(g.base, []) if g.kind != "abs" else []
        if g.kind in ("ratio", "ratio_min", "report"):
            per = [_ratio(a, b) for a, b in zip(mine, other, strict=False)]
        elif g.kind in ("plus", "report_plus"):
            per = [a - b for a, b in zip(mine, other, strict=False)]
        else:
            per = list(mine)
        vals = [v for v in per if not _isnan(v)]
        v = verdict(per, g.limit, at_least=g.kind == "ratio_min")
        med = figures[g.figure]["median"]
        out.append({
            "goal": g.text, "issue": g.issue, "figure": g.figure, "kind": g.kind, "limit": g.limit,
            "target": g.target, "base": g.base if g.kind != "abs" else None,
            "rounds": per, "n": len(vals), "median": median(per), **_minmax(per),
            "target_median": med.get(g.target, math.nan),
            "base_median": med.get(g.base, math.nan) if g.kind != "abs" else math.nan,
            "verdict": v, "judged": len(vals) >= MIN_JUDGED_ROUNDS,
            # kept for readers of older report.json files: the verdict in one flag
            "met": v == "met",
        })
    return out


def _goal_value(g: dict[str, Any], v: float) -> str:
    if _isnan(v):
        return "n/a"
    if g["kind"] in ("plus", "report_plus"):
        return f"{v:+,.0f} us"
    if g["kind"] == "abs":
        return _fmt(v, FIG[g["figure"]].unit)
    return f"{v:.2f}x"


def _goal_line(g: dict[str, Any]) -> str:
    unit = FIG[g["figure"]].unit
    if g["kind"] == "abs":
        against = f"{_fmt(g['target_median'], unit)}"
    else:
        against = f"{_fmt(g['target_median'], unit)} vs {_fmt(g['base_median'], unit)}"
    verdict_text = g["verdict"] if g["verdict"] != "reported" else "(figures only)"
    if g["verdict"] in ("met", "missed", "within noise"):
        verdict_text = f"**{verdict_text}**"
        if not g["judged"]:
            verdict_text += f" (only {g['n']} rounds: not judged, {MIN_JUDGED_ROUNDS} needed)"
    return (f"| {g['goal']} | {g['issue']} | {against} | {_goal_value(g, g['median'])} | "
            f"{_goal_value(g, g['min'])} - {_goal_value(g, g['max'])} | {g['n']} | {verdict_text} |")


def correctness(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in names:
        c = {"streams_ok": 0, "streams": 0, "crc_checked": 0, "bad_key_401": None, "good_key_ok": True,
             "denied_model_403": None, "usage_rows": None, "usage_tokens": 0, "last_used_stamped": None,
             "small_non_200": 0, "small_bodies_checked": 0, "small_bodies_bad": 0,
             "paced_chunks": 0, "paced_reframed": 0, "full_chunks": 0, "full_reframed": 0,
             "failures": [], "errors": []}
        for rnd in rounds:
            res = rnd["results"].get(n, {})
            for phase, r in res.items():
                if not isinstance(r, dict):
                    continue
                if "error" in r:
                    c["errors"].append(f"{phase}: {r['error']}")
                    continue
                c["streams_ok"] += r.get("streams_ok", 0)
                c["streams"] += r.get("streams", 0)
                c["crc_checked"] += r.get("crc_checked", 0)
                c["failures"] += [f"{phase}: {f}" for f in r.get("failures", [])]
            for auth in (res.get("auth", {}), res.get("auth_restart", {})):
                if "bad_key_401" in auth and n not in KEYLESS_TARGETS:
                    c["bad_key_401"] = bool(auth["bad_key_401"]) if c["bad_key_401"] is None else (
                        c["bad_key_401"] and bool(auth["bad_key_401"]))
                if "good_key_ok" in auth:
                    c["good_key_ok"] = (c["good_key_ok"] and bool(auth["good_key_ok"])
                                        and bool(auth.get("stream_ok")))
                if "denied_model_403" in auth:
                    c["denied_model_403"] = bool(auth["denied_model_403"]) and c["denied_model_403"] is not False
            acc = res.get("accounting")
            if isinstance(acc, dict) and "usage_rows" in acc:
                # Per round: the rows the round's last fastgate process wrote to its (fresh) key store.
                c["usage_rows"] = (c["usage_rows"] or 0) + acc["usage_rows"]
                c["usage_tokens"] += acc.get("usage_tokens", 0)
                stamped = bool(acc.get("last_used_stamped")) and bool(acc["usage_rows"])
                c["last_used_stamped"] = stamped and c["last_used_stamped"] is not False
            small = res.get("small", {})
            c["small_non_200"] += small.get("non_200", 0)
            c["small_bodies_checked"] += small.get("bodies_checked", 0)
            c["small_bodies_bad"] += small.get("bodies_bad", 0)
            for phase, prefix in (("paced", "paced"), ("full_speed", "full")):
                r = res.get(phase, {})
                c[f"{prefix}_chunks"] += r.get("chunks", 0)
                c[f"{prefix}_reframed"] += r.get("reframed_chunks", 0)
        c["failures"] = c["failures"][:10]
        c["ok"] = (c["streams"] > 0 and c["streams_ok"] == c["streams"] and c["bad_key_401"] is not False
                   and c["good_key_ok"] and not c["small_non_200"] and not c["small_bodies_bad"]
                   and not c["errors"] and c["denied_model_403"] is not False
                   and c["usage_rows"] != 0 and c["last_used_stamped"] is not False)
        c["framing_preserved"] = c["paced_reframed"] == 0 and c["full_reframed"] == 0
        out[n] = c
    return out


def harness_cost(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in names:
        vals: dict[str, list[float]] = {}
        for rnd in rounds:
            res = rnd["results"].get(n, {})
            for phase, field in (("paced", "client_cpu_per_token_us"), ("paced", "upstream_cpu_per_token_us"),
                                 ("full_speed", "client_cpu_per_token_us"),
                                 ("full_speed", "upstream_cpu_per_token_us"),
                                 ("small", "client_cpu_per_request_us"), ("small", "client_cpu_util"),
                                 ("small", "aux_cpu_per_request_us"), ("paced", "aux_cpu_per_token_us"),
                                 ("ttfb", "aux_cpu_per_request_us"), ("ttfb", "cpu_per_request_us"),
                                 ("small", "upstream_cpu_per_request_us"),
                                 ("full_speed", "proxy_cpu_util"), ("small", "proxy_cpu_util")):
                v = (res.get(phase) or {}).get(field)
                if isinstance(v, (int, float)):
                    vals.setdefault(f"{phase}.{field}", []).append(v)
        out[n] = {k: median(v) for k, v in vals.items()}
    return out


# -- text ----------------------------------------------------------------------------------------------------

def _fmt(v: float, unit: str = "") -> str:
    if v is None or _isnan(v):
        return "n/a"
    a = abs(v)
    if a >= 1000:
        s = f"{v:,.0f}"
    elif a >= 100:
        s = f"{v:.0f}"
    elif a >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return s + (f" {unit}" if unit else "")


def _pct(v: float) -> str:
    return "n/a" if _isnan(v) else f"{100 * v:.0f}%"


def one_line(phase: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + str(r["error"])[:80]
    if phase == "auth":
        denied = f" other model {r['denied_model_status']}" if "denied_model_status" in r else ""
        return f"good {r.get('good_key_status')} bad {r.get('bad_key_statuses', 'n/a')}{denied}"
    if phase == "accounting":
        return (f"{r['usage_rows']} usage rows ({r['usage_tokens']:,} tokens, {r['usage_errors']} errors) "
                f"in the key store, last use {'stamped' if r['last_used_stamped'] else 'NOT stamped'}")
    if phase == "paced":
        return (f"lat p50 {_fmt(r['latency_p50_us'])} us p99 {_fmt(r['latency_p99_us'])} us, "
                f"cpu/token {_fmt(r['cpu_per_token_us'])} us, ok {r['streams_ok']}/{r['streams']}")
    if phase == "full_speed":
        return (f"{_fmt(r['tokens_per_s'])} tok/s, cpu/token {_fmt(r['cpu_per_token_us'])} us, "
                f"ok {r['streams_ok']}/{r['streams']}, reframed {r['reframed_chunks']}/{r['chunks']}")
    if phase == "small":
        split = r.get("process_cpu_shares") or []
        return (f"{_fmt(r['requests_per_s'])} req/s, p99 {_fmt(r['p99_us'])} us, "
                f"cpu/req {_fmt(r['cpu_per_request_us'])} us, non-200 {r['non_200']}"
                + (f", CPU split over processes {' / '.join(_pct(x) for x in split)}" if split else ""))
    if phase == "ttfb":
        return f"p50 {_fmt(r['p50_us'])} us p99 {_fmt(r['p99_us'])} us, ok {r['streams_ok']}/{r['streams']}"
    if phase.startswith("live"):
        return (f"lat p50 {_fmt(r['latency_p50_us'])} p99 {_fmt(r['latency_p99_us'])} p99.9 "
                f"{_fmt(r['latency_p999_us'])} us, cpu/token {_fmt(r['cpu_per_token_us'])} us, "
                f"client {_fmt(r['client_cpu_util'])} CPUs, stream {_fmt(r['stream_s_p50'])} s, "
                f"ok {r['streams_ok']}/{r['streams']}")
    if phase == "mem_idle":
        return (f"{_fmt(r['per_idle_conn_kib'])} KiB/idle conn ({r['conns_open']}/{r['conns']} open, "
                f"RSS {r['base_kib']} -> {r['after_kib']} KiB)")
    if phase == "mem_active":
        return (f"{_fmt(r['per_active_stream_kib'])} KiB/active stream "
                f"({r['streams_flowing']}/{r['active_streams']} flowing, "
                f"RSS {r['base_kib']} -> {r['after_kib']} KiB)")
    return ""


def markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    names = data["targets"]
    figs = data["figures"]
    noise = data["noise"]
    p = env["params"]
    nrounds = len(data["rounds"])
    lines = [
        f"# fastgate benchmark: {env['date']}",
        "",
        f"Machine: {env['nproc']} CPUs, {env['cpu_model']} (cpuidle: {env['cpuidle_driver']}), "
        f"Linux {env['kernel']}, Python {env['python']}, {env['nginx']}. "
        f"fastgate {env['versions'].get('fastgate')} at {env['fastgate_commit']}, "
        f"logging {env['fastgate_log']}. "
        f"Seed: FastAPI {env['versions'].get('fastapi')}, uvicorn {env['versions'].get('uvicorn')}, "
        f"httpx {env['versions'].get('httpx')}.",
        "",
        f"Run: {nrounds} rounds, targets interleaved (A B C D, D C B A, ...), medians over rounds; "
        f"{'quick; ' if env['quick'] else ''}"
        f"{'proxy pinned to one CPU; ' if env['pin'] else 'no CPU pinning; '}"
        f"{'SCHED_IDLE spinners during the latency phases (paced, TTFB, live); ' if env['spinners'] else ''}"
        f"took {env.get('duration_s', '?')} s.",
        "",
        f"**Noise:** figures moved by a median of {_pct(noise['median_spread'])} between rounds "
        f"(worst {_pct(noise['max_spread'])}; (max-min)/median per figure and target). "
        f"Other processes on the machine used {_fmt(noise['others_cpus_median'])} CPUs during a median "
        f"window (max "
        f"{_fmt(noise['others_cpus_max'])} of {env['nproc']}); CPU steal {_fmt(noise['steal_pct'])}%; "
        f"calibration loop spread {_pct(noise['calibration_spread'])}.",
        "",
    ]
    lines += goals_markdown(data)
    lines += [
        "## Streaming",
        "",
        "| target | added latency/token p50 | p99 | CPU/token paced | CPU/token full speed "
        "| tokens/s full speed | TTFB p50 (added) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def m(key: str, n: str, unit: str = "us") -> str:
        return _fmt(figs[key]["median"].get(n, math.nan), unit)

    for n in names:
        lines.append(f"| {n} | {m('latency_p50', n)} | {m('latency_p99', n)} | {m('cpu_token_paced', n)} | "
                     f"{m('cpu_token_full', n)} | {m('tokens_per_s', n, '')} | "
                     f"{m('ttfb_p50', n)} ({m('ttfb_added', n)}) |")
    lines += [
        "",
        "## Small requests and memory",
        "",
        "| target | requests/s | p99 | CPU/request | memory/idle conn | memory/active stream |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n in names:
        lines.append(f"| {n} | {m('requests_per_s', n, '')} | {m('request_p99', n)} | "
                     f"{m('cpu_request', n)} | {m('mem_idle', n, 'KiB')} | {m('mem_active', n, 'KiB')} |")
    lines += [
        "",
        f"Paced: {p['paced_streams']} stream of {p['paced_tokens']} tokens {p['paced_gap_ms']:g} ms apart. "
        f"Full speed: {p['full_streams']} concurrent streams of {p['full_tokens']} tokens, no gap, "
        f"{p['full_window_s']:g} s window. Small: GET /api/version on {p['small_conns']} keep-alive "
        f"connections, closed loop, {p['small_window_s']:g} s. TTFB: {p['ttfb_requests']} one-token "
        f"streams in "
        f"sequence on a keep-alive connection. Memory: RSS growth over {p['idle_conns']} idle keep-alive "
        f"connections (after one request each), and over {p['active_streams']} streams "
        f"({p['active_gap_ms']:g} ms gap), each on a freshly started, warmed-up proxy. "
        f"Added = target minus direct in the same round.",
        "",
    ]
    ratios = data["ratios"]
    for base in ratio_bases(names):
        rb = ratios.get(f"vs_{base}")
        if not rb:
            continue
        others = [n for n in names if n not in (base, "direct")]
        lines += [f"## Ratios to {base} (lower is better except throughput)", "",
                  "| figure | " + " | ".join(others) + " |", "| --- |" + " --- |" * len(others)]
        for key in ("latency_p50", "latency_p99", "cpu_token_paced", "cpu_token_full", "tokens_per_s",
                    "requests_per_s", "cpu_request", "ttfb_added", "mem_idle", "mem_active"):
            row = rb.get(key, {})
            lines.append(f"| {FIG[key].label} | " + " | ".join(
                "n/a" if _isnan(row.get(n, math.nan)) else f"{row[n]:.2f}x" for n in others) + " |")
        lines.append("")
    lines += live_markdown(data)
    for pair, figs_p in data.get("paired_ratios", {}).items():
        lines += [f"## {pair}, round by round", "",
                  (f"The ratio {pair} in each round (the two measured seconds apart), its median, its "
                   "range (min - max) and spread ((max - min) / median), and the ratio of the medians."), "",
                  "| figure | per round | median | min - max | spread | ratio of medians |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for key, v in figs_p.items():
            per = ", ".join("n/a" if _isnan(x) else f"{x:.2f}" for x in v["rounds"])
            med = "n/a" if _isnan(v["median"]) else f"{v['median']:.3f}x"
            rng = "n/a" if _isnan(v["min"]) else f"{v['min']:.2f} - {v['max']:.2f}"
            rom = "n/a" if _isnan(v["ratio_of_medians"]) else f"{v['ratio_of_medians']:.3f}x"
            lines.append(f"| {FIG[key].label} | {per} | {med} | {rng} | {_pct(v['spread'])} | {rom} |")
        lines.append("")
    lines += ["## Correctness", "",
              "| target | streams intact | CRC-checked | bad/no key -> 401 | small requests "
              "| re-framed chunks (paced / full speed) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for n in names:
        c = data["correctness"][n]
        auth = "n/a" if c["bad_key_401"] is None else ("yes" if c["bad_key_401"] else "NO")
        if n in KEYLESS_TARGETS:
            auth = "n/a (checks no key)"
        small = (f"{c['small_non_200']} non-200, "
                 f"{c['small_bodies_bad']}/{c['small_bodies_checked']} bad bodies")
        verdict = "" if c["ok"] else " (FAIL)"
        lines.append(f"| {n} | {c['streams_ok']}/{c['streams']}{verdict} | {c['crc_checked']} | "
                     f"{auth} | {small} | {c['paced_reframed']}/{c['paced_chunks']} / "
                     f"{c['full_reframed']}/{c['full_chunks']} |")
        for f in c["failures"][:3] + c["errors"][:3]:
            lines.append(f"|  | {f} | | | | |")
    for n in names:
        c = data["correctness"][n]
        if c.get("usage_rows") is not None or c.get("denied_model_403") is not None:
            denied = {None: "not checked", True: "403", False: "NOT 403"}[c.get("denied_model_403")]
            lines += ["", (f"{n}: a model outside the key's allow-list -> {denied}; "
                           f"{c.get('usage_rows') or 0:,} usage records ({c.get('usage_tokens', 0):,} tokens) "
                           f"written to the key store over the rounds; key's last use "
                           f"{'stamped' if c.get('last_used_stamped') else 'NOT stamped'}.")]
    lines += ["", "## Noise: (max - min) / median across rounds",
              "", "(For latency figures, of the measured value before direct's is subtracted.)", "",
              "| figure | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for key in NOISE_FIGURES + ("latency_p99", "requests_per_s", "tokens_per_s", "mem_idle", "mem_active",
                                "live200_p50", "live200_p99", "live200_cpu"):
        sp = figs[key]["spread"]
        if not sp or all(_isnan(v) for v in sp.values()):
            continue  # a phase that did not run
        lines.append(f"| {FIG[key].label} | " + " | ".join(_pct(sp.get(n, math.nan)) for n in names) + " |")
    rs = noise["fastgate_over_nginx_ratio_spread"]
    if rs:
        lines += ["", "Spread of the per-round fastgate/nginx ratio: " + ", ".join(
            f"{FIG[k].label} {_pct(v)}" for k, v in rs.items()) + "."]
    lines += ["", "Direct's latency p50 per round (us): "
              + ", ".join(_fmt(v) for v in noise["direct_latency_p50_us_rounds"]) + ".", ""]
    hc = data["harness_cost"]
    lines += ["## Load generator cost (medians)", "",
              "| target | client CPU/token full speed | fake Ollama CPU/token full speed "
              "| client CPU/request | fake Ollama CPU/request | proxy CPU use full speed "
              "| proxy CPU use small requests |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for n in names:
        h = hc.get(n, {})
        lines.append(f"| {n} | {_fmt(h.get('full_speed.client_cpu_per_token_us', math.nan), 'us')} | "
                     f"{_fmt(h.get('full_speed.upstream_cpu_per_token_us', math.nan), 'us')} | "
                     f"{_fmt(h.get('small.client_cpu_per_request_us', math.nan), 'us')} | "
                     f"{_fmt(h.get('small.upstream_cpu_per_request_us', math.nan), 'us')} | "
                     f"{_pct(h.get('full_speed.proxy_cpu_util', math.nan)) if n != 'direct' else 'n/a'} | "
                     f"{_pct(h.get('small.proxy_cpu_util', math.nan)) if n != 'direct' else 'n/a'} |")
    aux = [n for n in names if any(hc.get(n, {}).get(k, 0.0) > 0 for k in (
        "small.aux_cpu_per_request_us", "ttfb.aux_cpu_per_request_us", "paced.aux_cpu_per_token_us"))]
    if aux:
        lines += ["", "Targets with [state]: the run's redis-server's CPU (not counted in the proxy's): " + "; ".join(
            f"{n} {_fmt(hc[n].get('small.aux_cpu_per_request_us', math.nan), 'us')} per small request, "
            f"{_fmt(hc[n].get('ttfb.aux_cpu_per_request_us', math.nan), 'us')} per one-token stream (TTFB "
            f"phase), {_fmt(hc[n].get('paced.aux_cpu_per_token_us', math.nan), 'us')} per paced token"
            for n in aux) + "."]
    tc = {n: hc.get(n, {}).get("ttfb.cpu_per_request_us", math.nan) for n in names if n != "direct"}
    if any(not _isnan(v) for v in tc.values()):
        lines += ["", "Proxy CPU per one-token stream in the TTFB phase (requests in sequence): " + ", ".join(
            f"{n} {_fmt(v, 'us')}" for n, v in tc.items() if not _isnan(v)) + "."]
    for n in names:
        splits = [(r["results"].get(n) or {}).get("small", {}).get("process_cpu_shares") for r in data["rounds"]]
        splits = [sp for sp in splits if sp]
        if splits:
            lines += ["", f"{n}: share of its CPU per process in the small-request window, supervisor first, "
                          "per round: " + "; ".join(" / ".join(_pct(x) for x in sp) for sp in splits) + "."]
    cu = {n: hc.get(n, {}).get("small.client_cpu_util", math.nan) for n in names}
    if any(not _isnan(v) for v in cu.values()):
        lines += ["", "Load generator's CPU use during the small-request window (CPUs): " + ", ".join(
            f"{n} {_fmt(v)}" for n, v in cu.items() if not _isnan(v)) + "."]
    b = data.get("backends")
    if b:
        from .backends import markdown as backends_markdown

        lines += ["", backends_markdown(b, level=2) if "error" not in b else
                  f"## Several backends (bench.backends)\n\nERROR: {b['error']}"]
    lines.append("")
    return "\n".join(lines)


def goals_markdown(data: dict[str, Any]) -> list[str]:
    """The Goals table: each goal's per-round comparison, its median, its range and the verdict."""
    if not data["goals"]:
        return []
    nrounds = len(data["rounds"])
    lines = ["## Goals", "",
             (f"Each goal is judged from its comparison in every round (fastgate / nginx in the same round, "
              f"measured seconds apart; for \"+ us\" goals the difference): the **median of the per-round "
              f"values** and their **range (min - max)**. Verdict: **met** when every round is on the good "
              f"side of the line, **missed** when every round is beyond it, **within noise** when the range "
              f"crosses it. Goals are judged only over {MIN_JUDGED_ROUNDS} or more rounds "
              f"(this run: {nrounds})."), "",
             ("| goal | issue | medians (target vs base) | median of per-round | range (min - max) | rounds "
              "| verdict |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    ran = data["environment"].get("phases")
    # goals whose phase ran (all, for a report.json written before the phases were recorded)
    shown = [g for g in data["goals"] if (g["n"] if ran is None else FIG[g["figure"]].phase in ran)]
    lines += [_goal_line(g) for g in shown]
    corr = data["correctness"].get("fastgate", {})
    if corr:
        lines.append(f"| framing: every upstream chunk arrives as the same chunk | 2 | "
                     f"{corr.get('paced_reframed', 0) + corr.get('full_reframed', 0)} re-framed of "
                     f"{corr.get('paced_chunks', 0) + corr.get('full_chunks', 0)} | | | | "
                     f"{'**met**' if corr.get('framing_preserved') else '**missed**'} |")
    counts = {v: sum(1 for g in shown if g["verdict"] == v) for v in ("met", "within noise", "missed")}
    judged = all(g["judged"] for g in shown if g["verdict"] in counts)
    lines += ["", ("In short: " + ", ".join(f"{n} {v}" for v, n in counts.items())
                   + ("." if judged else f" -- indicative only: {nrounds} rounds, not judged."))]
    lines.append("")
    return lines


def live_markdown(data: dict[str, Any]) -> list[str]:
    """Live streams: how added latency grows with the number of concurrent paced streams."""
    figs = data["figures"]
    names = data["targets"]
    levels = [n for n in LIVE_LEVELS if any(figs[f"live{n}_p50"]["median"].get(t) is not None
                                            and not _isnan(figs[f"live{n}_p50"]["median"].get(t, math.nan))
                                            for t in names)]
    if not levels:
        return []
    p = data["environment"]["params"]
    rounds_run = max(len([v for v in figs[f"live{n}_p50"]["rounds"].get("direct", []) if not _isnan(v)])
                     for n in levels)
    lines = ["## Live streams", "",
             (f"N concurrent streams of {p.get('live_tokens')} tokens, {p.get('live_gap_ms'):g} ms apart "
              f"({1000 / p.get('live_gap_ms', 50):g} tokens/s), their starts spread evenly over one gap; "
              f"per-token latency over every token of every stream, added = minus direct's in the same round; "
              f"CPU per token of the proxy over the whole exchange (requests included). Medians over "
              f"{rounds_run} rounds. Client CPU: CPUs' worth the load client used during the phase (1.0 would "
              f"mean it was the bottleneck)."), "",
             ("| live streams | target | added p50 | added p99 | added p99.9 | CPU/token | first token p50 / p99 "
              "| stream time p50 / max (expected) | client CPU | streams intact |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    worst_client = 0.0
    for n in levels:
        for t in names:
            which = "median_raw" if t == "direct" else "median"  # direct: its absolute latency, the floor
            med = {k: figs[f"live{n}_{k}"][which].get(t, math.nan) for k in ("p50", "p99", "p999", "cpu",
                                                                               "client")}
            rs = [(r["results"].get(t) or {}).get(f"live{n}") or {} for r in data["rounds"]]
            rs = [r for r in rs if "streams" in r]
            if not rs:
                continue
            ok = sum(r["streams_ok"] for r in rs)
            total = sum(r["streams"] for r in rs)
            dur = median([r.get("stream_s_p50", math.nan) for r in rs])
            dur_max = median([r.get("stream_s_max", math.nan) for r in rs])
            ft50 = median([r.get("first_token_ms_p50", math.nan) for r in rs])
            ft99 = median([r.get("first_token_ms_p99", math.nan) for r in rs])
            exp = rs[0].get("stream_s_expected", math.nan)
            worst_client = max([worst_client] + [r.get("client_cpu_util", 0.0) for r in rs])
            floor = t == "direct"
            lines.append(
                f"| {n} | {t} | {'(floor) ' + _fmt(med['p50']) if floor else _fmt(med['p50'], 'us')} | "
                f"{'(floor) ' + _fmt(med['p99']) if floor else _fmt(med['p99'], 'us')} | "
                f"{'(floor) ' + _fmt(med['p999']) if floor else _fmt(med['p999'], 'us')} | "
                f"{'-' if floor else _fmt(med['cpu'], 'us')} | {_fmt(ft50)} / {_fmt(ft99)} ms | "
                f"{_fmt(dur)} / {_fmt(dur_max)} s ({_fmt(exp)} s) | "
                f"{_fmt(med['client'])} | {ok}/{total} |")
    lines += ["", ("First token: from writing the request to the first token item, which includes any wait "
                   "before the request reached Ollama; per-token latency (from the fake's send time) cannot see "
                   "such a wait, so a proxy that queues requests (the seed's httpx pool holds 100 connections by "
                   "default) shows it here and in the stream time, not in the added latency."),
              "", (f"Direct's rows are absolute latencies (the floor). Highest client CPU use in any live window: "
                   f"{_fmt(worst_client)} CPUs"
                   + (" -- the client was near saturation: latencies at this level include its own queueing."
                      if worst_client > 0.8 else " (not saturated).")), ""]
    return lines


# -- chart ---------------------------------------------------------------------------------------------------

COLORS = {"direct": "#888888", "fastgate": "#1f77b4", "nginx": "#2ca02c", "seed": "#d62728"}
EXTRA_COLORS = ("#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22")


def _color(name: str, names: list[str]) -> str:
    if name in COLORS:
        return COLORS[name]
    extra = [n for n in names if n not in COLORS]
    return EXTRA_COLORS[extra.index(name) % len(EXTRA_COLORS)]


def chart(data: dict[str, Any], rounds: list[dict[str, Any]], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (bash bench/setup.sh installs it)")
        return False
    names = data["targets"]
    figs = data["figures"]
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8), gridspec_kw={"width_ratios": [1.5, 1.1, 0.8, 1.1]})
    ax = axes[0]
    for n in names:
        samples = sorted(v for r in rounds for v in (r["results"].get(n, {}).get("paced") or {}).get(
            "latency_us_sample", []))
        if not samples:
            continue
        ys = [(i + 1) / len(samples) for i in range(len(samples))]
        ax.plot(samples, ys, label=n, color=_color(n, names), linewidth=1.6)
    ax.set_xscale("log")
    ax.set_xlabel("per-token latency: client arrival - upstream send (us, log)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("Latency per token (paced stream), CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.axhline(0.5, color="#bbbbbb", linewidth=0.8)
    ax.axhline(0.99, color="#bbbbbb", linewidth=0.8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()

    proxies = [n for n in names if n != "direct"]
    tick_style = {"rotation": 25, "fontsize": 8} if len(proxies) > 3 else {}
    ax = axes[1]
    width = 0.38
    xs = range(len(proxies))
    for off, key, label, hatch in ((-width / 2, "cpu_token_paced", "paced (2 ms)", ""),
                                   (width / 2, "cpu_token_full", "full speed, 32 streams", "//")):
        vals = [figs[key]["median"].get(n, math.nan) for n in proxies]
        bars = ax.bar([x + off for x in xs], vals, width, label=label,
                      color=[_color(n, names) for n in proxies], hatch=hatch, edgecolor="white")
        for b, v in zip(bars, vals, strict=True):
            if not _isnan(v):
                ax.annotate(_fmt(v), (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), proxies, **tick_style)
    if any(figs[k]["median"].get(n, math.nan) > 0 for k in ("cpu_token_paced", "cpu_token_full") for n in proxies):
        ax.set_yscale("log")
    ax.set_ylabel("proxy CPU per token (us, log)")
    ax.set_title("CPU per token (plain: paced, hatched: full speed)")
    ax.grid(True, axis="y", which="both", alpha=0.3)

    ax = axes[2]
    vals = [figs["cpu_request"]["median"].get(n, math.nan) for n in proxies]
    bars = ax.bar(list(xs), vals, 0.6, color=[_color(n, names) for n in proxies])
    for b, v in zip(bars, vals, strict=True):
        if not _isnan(v):
            ax.annotate(_fmt(v), (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), proxies, **tick_style)
    if any(v > 0 for v in vals):
        ax.set_yscale("log")
    ax.set_ylabel("proxy CPU per request (us, log)")
    ax.set_title("CPU per small request")
    ax.grid(True, axis="y", which="both", alpha=0.3)

    ax = axes[3]
    drawn = False
    for n in proxies:
        for suffix, style, width in (("p50", "-", 1.8), ("p99", "--", 1.2)):
            pts = [(lv, figs[f"live{lv}_{suffix}"]["median"].get(n, math.nan)) for lv in LIVE_LEVELS]
            pts = [(x, y) for x, y in pts if not _isnan(y) and y > 0]  # log axis: added <= 0 is not drawn
            if pts:
                drawn = True
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", linewidth=width,
                        color=_color(n, names), label=f"{n} {suffix}")
    if drawn:
        ax.set_yscale("log")
        ax.set_xticks(list(LIVE_LEVELS), [str(lv) for lv in LIVE_LEVELS])
        ax.legend(fontsize=7)
    ax.set_xlabel("concurrent live streams (20 tokens/s each)")
    ax.set_ylabel("added latency per token (us, log)")
    ax.set_title("Live streams: added p50 (solid), p99 (dashed)")
    ax.grid(True, which="both", alpha=0.3)
    env = data["environment"]
    fig.suptitle(f"fastgate benchmark {env['date']}: {env['nproc']} CPUs, {env['cpu_model']}; "
                 f"noise {_pct(data['noise']['median_spread'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
