"""bench/report.py's goal verdicts: judged from per-round comparisons, with the range, never from one ratio."""

from __future__ import annotations

import math

from bench import report


def _rounds(per_round: list[dict[str, dict[str, dict[str, float]]]]) -> list[dict[str, object]]:
    return [{"order": [], "calibration_ms": 1.0, "system": {}, "results": r} for r in per_round]


def _small(fg_cpu: float, ng_cpu: float) -> dict[str, dict[str, dict[str, float]]]:
    return {"direct": {"small": {"cpu_per_request_us": 0.0, "requests_per_s": 1000.0}},
            "fastgate": {"small": {"cpu_per_request_us": fg_cpu, "requests_per_s": 100.0}},
            "nginx": {"small": {"cpu_per_request_us": ng_cpu, "requests_per_s": 200.0}}}


def _goal(data: dict[str, object], figure: str, target: str = "fastgate") -> dict[str, object]:
    found = [g for g in data["goals"] if g["figure"] == figure and g["target"] == target]  # type: ignore[index]
    assert len(found) == 1, found
    return found[0]


def test_verdict_rule() -> None:
    assert report.verdict([4.0, 4.5, 4.9], 5.0) == "met"
    assert report.verdict([4.0, 5.0], 5.0) == "met"  # on the line counts as met
    assert report.verdict([4.0, 5.1], 5.0) == "within noise"
    assert report.verdict([5.1, 9.0], 5.0) == "missed"
    assert report.verdict([0.5, 0.45], 0.4, at_least=True) == "met"
    assert report.verdict([0.5, 0.3], 0.4, at_least=True) == "within noise"
    assert report.verdict([0.2, 0.3], 0.4, at_least=True) == "missed"
    assert report.verdict([math.nan, 6.0], 5.0) == "missed"  # an unmeasured round is left out
    assert report.verdict([], 5.0) == "not measured"
    assert report.verdict([1.0], math.nan) == "reported"


def test_goal_uses_median_of_per_round_ratios_and_its_range() -> None:
    # fastgate/nginx per round: 4, 4, 4, 4, 6, 6, 6 -> median 4 (met by the median, not by every round)
    pairs = [(40.0, 10.0)] * 4 + [(60.0, 10.0)] * 3
    data = report.build({"system": {}}, ["direct", "fastgate", "nginx"], _rounds([_small(*p) for p in pairs]))
    g = _goal(data, "cpu_request")
    assert g["rounds"] == [4.0, 4.0, 4.0, 4.0, 6.0, 6.0, 6.0]
    assert g["median"] == 4.0 and g["min"] == 4.0 and g["max"] == 6.0
    assert g["verdict"] == "within noise"
    assert g["judged"] is True
    thr = _goal(data, "requests_per_s")
    assert thr["verdict"] == "met" and thr["median"] == 0.5  # 100/200 >= 0.4 in every round


def test_per_round_ratio_differs_from_ratio_of_medians() -> None:
    # Rounds where the machine slowed both targets together: per round fastgate/nginx is 2 in six rounds
    # and 10 in one, so the goal's median is 2; the medians of the figures (100 and 10) come from different
    # rounds, and their ratio, 10, is what the previous harness judged by.
    pairs = [(20.0, 10.0)] * 3 + [(100.0, 10.0)] + [(100.0, 50.0)] * 3
    data = report.build({"system": {}}, ["direct", "fastgate", "nginx"], _rounds([_small(*p) for p in pairs]))
    g = _goal(data, "cpu_request")
    assert g["median"] == 2.0 and g["min"] == 2.0 and g["max"] == 10.0
    assert data["ratios"]["vs_nginx"]["cpu_request"]["fastgate"] == 10.0
    assert g["verdict"] == "within noise"


def test_too_few_rounds_are_not_judged_and_the_markdown_says_so() -> None:
    pairs = [(60.0, 10.0), (70.0, 10.0)]
    data = report.build({"system": {}}, ["direct", "fastgate", "nginx"], _rounds([_small(*p) for p in pairs]))
    g = _goal(data, "cpu_request")
    assert g["verdict"] == "missed" and g["judged"] is False
    line = report._goal_line(g)
    assert "not judged" in line and "6.00x - 7.00x" in line


def test_added_latency_goal_compares_added_figures_round_by_round() -> None:
    def live(direct: float, fg: float, ng: float) -> dict[str, dict[str, dict[str, float]]]:
        return {n: {"live200": {"latency_p50_us": v, "latency_p99_us": v}}
                for n, v in (("direct", direct), ("fastgate", fg), ("nginx", ng))}

    # added: fastgate 100 - 50 = 50 and nginx 70 - 50 = 20 -> 2.5x in round 1; 30/20 = 1.5x in round 2;
    # a round where nginx adds nothing has no ratio and is left out of the count.
    rounds = _rounds([live(50, 100, 70), live(50, 80, 70), live(50, 90, 50)])
    data = report.build({"system": {}}, ["direct", "fastgate", "nginx"], rounds)
    g = _goal(data, "live200_p50")
    assert g["n"] == 2 and g["min"] == 1.5 and g["max"] == 2.5
    assert g["verdict"] == "within noise"
