import pytest
import yaml

from autocompress.errors import AutocompressError
from autocompress.hardware.profile import (
    ALIASES,
    available_profiles,
    load_profile,
    profile_to_yaml,
    read_profile,
    resolve_device,
)

from .conftest import make_profile

REQUIRED_DEVICES = [
    "jetson-orin-nano-4gb", "jetson-orin-nano-8gb", "jetson-orin-nano-8gb-super",
    "jetson-orin-nx-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb",
    "jetson-agx-thor", "raspberry-pi-5-8gb", "apple-m2", "rtx-4090", "a100-40gb", "h100-sxm"]


def test_every_shipped_profile_loads_and_cites_its_figures():
    profiles = available_profiles()
    assert set(REQUIRED_DEVICES) <= set(profiles)
    for name, path in profiles.items():
        profile = read_profile(path)
        assert profile.name == name  # file name and name field agree
        cited = {s.field for s in profile.sources}
        assert any(c.startswith("memory") for c in cited)
        for alias, target in ALIASES.items():
            assert target in profiles, alias


def test_jetson_bandwidths_are_the_datasheet_figures():
    expected = {"jetson-orin-nano-4gb": 34, "jetson-orin-nano-8gb": 68,
                "jetson-orin-nano-8gb-super": 102, "jetson-agx-orin-64gb": 204.8,
                "jetson-agx-orin-32gb": 204.8}
    for name, gbps in expected.items():
        profile = load_profile(name)
        assert profile.memory.bandwidth_gbps == pytest.approx(gbps, rel=0.01)
        assert profile.compute.sparse_2_4


def test_alias_resolves_and_says_what_it_chose():
    path, note = resolve_device("jetson")
    assert path.stem == ALIASES["jetson"] and "jetson-orin-nano-8gb" in note


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(AutocompressError, match="unknown device 'jetsn'.*jetson-orin-nano-8gb"):
        load_profile("jetsn")


def test_yaml_round_trip(tmp_path):
    profile = load_profile("jetson-orin-nano-8gb")
    path = tmp_path / "copy.yaml"
    path.write_text(profile_to_yaml(profile))
    assert read_profile(path) == profile


def _write(tmp_path, data) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def _good() -> dict:
    return yaml.safe_load(profile_to_yaml(make_profile()))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["memory"].pop("bandwidth_gbps"), "missing field memory.bandwidth_gbps"),
    (lambda d: d["memory"].update(bandwidth_gbps=-5), "memory.bandwidth_gbps"),
    (lambda d: d.update(colour="green"), "unknown key colour"),
    (lambda d: d["formats"].update(q9={"efficiency": 0.5}), "unknown format 'q9'"),
    (lambda d: d["formats"]["q4"].update(efficiency=1.5), "formats.q4.efficiency"),
    (lambda d: d["memory"].update(capacity="8 bananas"), "memory.capacity"),
    (lambda d: d.update(sources=[{"field": "memory", "note": "x"}]),
     "no sources entry for compute.peak_tflops.f16"),
    (lambda d: d.update(schema_version=7), "schema_version 7"),
])
def test_bad_profiles_get_one_clear_line(tmp_path, mutate, message):
    data = _good()
    mutate(data)
    with pytest.raises(AutocompressError, match=message) as info:
        load_profile(_write(tmp_path, data))
    assert "\n" not in str(info.value)


def test_unreadable_yaml_and_missing_file(tmp_path):
    with pytest.raises(AutocompressError, match="not valid YAML at line"):
        load_profile(_write(tmp_path, "memory: [unclosed\n  bandwidth: 3"))
    with pytest.raises(AutocompressError, match="does not exist"):
        load_profile(str(tmp_path / "nope.yaml"))
    with pytest.raises(AutocompressError, match="YAML mapping"):
        load_profile(_write(tmp_path, "- a\n- b\n"))
