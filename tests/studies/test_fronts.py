"""`study fronts` on the tiny model: its outputs (a front per device, every point measured and
predicted, the CSV and figures, the comparison at equal memory), resume after an interrupt
without measuring a plan twice, and a resume under other settings refused."""

import csv
import json

import pytest

from autocompress.errors import AutocompressError
from autocompress.search.measure import PlanMeter
from autocompress.studies import fronts
from autocompress.studies.fronts import FrontsSettings, run_fronts

DEVICES = ("jetson-orin-nano-8gb", "raspberry-pi-5-8gb", "rtx-4090")
_MEASURE = PlanMeter.measure
SETTINGS = FrontsSettings(devices=DEVICES, points=3, eval_windows=1, calib_windows=2,
                          window_len=64, context=256)


class _Stopped(Exception):
    pass


def _counting_meter(monkeypatch, fail_after=None):
    """PlanMeter.measure counted (and interrupted after ``fail_after`` plans)."""
    calls = []
    real = _MEASURE  # the unpatched one, however often this is called

    def measure(self, configs, desc="measure"):
        if fail_after is not None and len(calls) == fail_after:
            raise _Stopped  # as an interrupt or a kill would stop it
        calls.append(1)
        return real(self, configs, desc)

    monkeypatch.setattr(PlanMeter, "measure", measure)
    return calls


def test_a_front_per_device_measured_and_predicted(tiny_loaded, tmp_path, monkeypatch):
    calls = _counting_meter(monkeypatch)
    data = run_fronts(tiny_loaded, SETTINGS, tmp_path, progress=False, log=lambda m: None)
    assert list(data["devices"]) == list(DEVICES)
    signatures = set()
    for device, front in data["devices"].items():
        assert len(front) >= 2
        sizes = [p["total_bytes"] for p in front]
        assert sizes == sorted(sizes, reverse=True)  # largest plan first
        # on a front, less memory never measures better by the proxy's own account
        predicted = [p["predicted_loss"] for p in front]
        assert predicted == sorted(predicted)
        assert all(p["kl"] >= 0 and p["ppl"] > 1 and p["tokens_per_s"] > 0 for p in front)
        signatures |= {p["signature"] for p in front}
    assert len(calls) == len(signatures) == len(data["measured"])  # a shared plan measured once
    # the speed model differs by device: the same plan is predicted faster on a 4090
    first = {d: f[0] for d, f in data["devices"].items()}
    if first["rtx-4090"]["signature"] == first["raspberry-pi-5-8gb"]["signature"]:
        assert first["rtx-4090"]["tokens_per_s"] > first["raspberry-pi-5-8gb"]["tokens_per_s"]
    rows = list(csv.DictReader((tmp_path / "fronts.csv").open()))
    assert len(rows) == sum(len(f) for f in data["devices"].values())
    for name in ["overlay.png", "formats.png", *(f"front-{d}.png" for d in DEVICES)]:
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    equal = data["equal_memory"]
    assert set(equal["devices"]) == set(DEVICES)
    for device in DEVICES:
        bits = equal["devices"][device]["bits_per_weight"]
        assert len(bits) == len(tiny_loaded.layers) and all(0 < b <= 32 for b in bits.values())
    assert json.loads((tmp_path / "fronts.json").read_text())["protocol"]["devices"] == \
        list(DEVICES)


def test_an_interrupted_study_resumes_without_measuring_a_plan_twice(tiny_loaded, tmp_path,
                                                                      monkeypatch):
    _counting_meter(monkeypatch, fail_after=1)
    with pytest.raises(_Stopped):
        run_fronts(tiny_loaded, SETTINGS, tmp_path, progress=False, log=lambda m: None)
    kept = json.loads((tmp_path / "fronts.json").read_text())["measured"]
    assert len(kept) == 1  # written as it was measured
    calls = _counting_meter(monkeypatch)
    data = run_fronts(tiny_loaded, SETTINGS, tmp_path, resume=True, progress=False,
                      log=lambda m: None)
    assert len(calls) == len(data["measured"]) - 1
    assert data["measured"][next(iter(kept))] == kept[next(iter(kept))]
    with pytest.raises(AutocompressError, match="other settings.*points"):
        run_fronts(tiny_loaded, fronts.FrontsSettings(**{**SETTINGS.__dict__, "points": 4}),
                   tmp_path, resume=True, progress=False, log=lambda m: None)


def _quick_meter(monkeypatch):
    """Plans 'measured' instantly (the speed limit is what these tests are about)."""
    monkeypatch.setattr(PlanMeter, "measure", lambda self, configs, desc="measure":
                        {"kl": 0.1, "ppl": 2.0})


def test_a_speed_limit_keeps_that_devices_plans_at_or_above_it(tiny_loaded, tmp_path,
                                                               monkeypatch):
    _quick_meter(monkeypatch)
    free = run_fronts(tiny_loaded, SETTINGS, tmp_path / "free", progress=False,
                      log=lambda m: None)
    pi = "raspberry-pi-5-8gb"
    speeds = sorted(p["tokens_per_s"] for p in free["devices"][pi])
    assert speeds[0] < speeds[-1]  # the front spans speeds: a limit inside it binds
    limit = (speeds[0] + speeds[-1]) / 2
    settings = FrontsSettings(**{**SETTINGS.__dict__, "min_tps": ((pi, limit),)})
    limited = run_fronts(tiny_loaded, settings, tmp_path / "limited", progress=False,
                         log=lambda m: None)
    front = limited["devices"][pi]
    assert front and all(p["tokens_per_s"] >= limit * (1 - 1e-9) for p in front)
    assert [p["tokens_per_s"] for p in free["devices"][pi]] != [p["tokens_per_s"] for p in front]
    # the other devices keep their free fronts, and the protocol names the limit
    for device in set(DEVICES) - {pi}:
        assert [p["signature"] for p in limited["devices"][device]] == \
            [p["signature"] for p in free["devices"][device]]
    assert limited["protocol"]["min_tps"] == {pi: limit}
    # at equal memory too: the Pi's optimum meets its limit, the free one does not need to
    equal = limited["equal_memory"]["devices"]
    assert equal[pi]["tokens_per_s"] >= limit * (1 - 1e-9)
    assert all(d["tokens_per_s"] > 0 for d in free["equal_memory"]["devices"].values())


@pytest.mark.parametrize("min_tps, message", [
    ((("raspberry-pi-5-8gb", 1e9),), "no plan of the space decodes at 1e\\+09 tokens/s"),
    ((("jetson-agx-orin", 5.0),), "not among --devices"),
    ((("rtx-4090", 0.0),), "must be positive"),
])
def test_an_impossible_or_misnamed_speed_limit_is_one_line(tiny_loaded, tmp_path, monkeypatch,
                                                           min_tps, message):
    _quick_meter(monkeypatch)
    with pytest.raises(AutocompressError, match=message):
        run_fronts(tiny_loaded, FrontsSettings(**{**SETTINGS.__dict__, "min_tps": min_tps}),
                   tmp_path, progress=False, log=lambda m: None)
