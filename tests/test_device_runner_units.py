"""device_runner pieces that need no bundle: profiles, energy sensors, schedule, data, cache."""
from __future__ import annotations


import numpy as np
import pytest
import yaml
from PIL import Image

from device_runner import energy, schedule
from device_runner.cache import FeatureCache
from device_runner.data import load_imagefolder, stratified_split
from device_runner.errors import BundleError, DataError, ProfileError
from device_runner.profile import PROFILES_DIR, load_profile

BOARDS = ["raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano", "generic-x86"]


@pytest.mark.parametrize("board", BOARDS)
def test_every_board_profile_is_valid_and_sourced(board):
    profile = load_profile(board)
    assert profile.name == board
    assert 0 < profile.idle_w < profile.busy_w
    assert profile.memory_mb < profile.ram_mb and profile.threads <= profile.cores
    assert profile.raw["power"].get("sources") or profile.raw["board"].get("sources")


def test_profile_facts_match_the_boards():
    facts = {b: load_profile(b) for b in BOARDS}
    assert facts["raspberry-pi-4"].cores == 4 and facts["raspberry-pi-5"].cores == 4
    assert facts["jetson-orin-nano"].cores == 6 and facts["jetson-nano"].cores == 4
    assert facts["raspberry-pi-5"].sensor == "auto" and facts["raspberry-pi-4"].sensor == "none"


def test_profile_errors_name_the_field(tmp_path):
    raw = yaml.safe_load((PROFILES_DIR / "raspberry-pi-4.yaml").read_text())
    raw["budgets"]["memory_mb"] = 99999
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ProfileError, match="exceeds the board's RAM"):
        load_profile(str(path))
    raw["budgets"]["memory_mb"] = 100
    raw["power"]["sensor"] = "multimeter"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ProfileError, match=r"power.sensor: 'multimeter' is not one of"):
        load_profile(str(path))
    path.write_text("name: [unclosed")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(str(path))
    with pytest.raises(ProfileError, match="raspberry-pi-4"):
        load_profile("no-such-board")


def test_pmic_output_is_parsed_to_watts():
    text = ("     3V7_WL_SW_A current(0)=0.10000000A\n     3V7_WL_SW_V volt(8)=3.70000000V\n"
            "   VDD_CORE_A current(7)=2.00000000A\n   VDD_CORE_V volt(15)=0.80000000V\n"
            "   EXT5V_V volt(24)=5.10000000V\n")
    assert energy.parse_pmic(text) == pytest.approx(0.37 + 1.6)
    assert energy.parse_pmic("vcgencmd: not supported") is None


def test_jetson_orin_hwmon_rails(tmp_path):
    hwmon = tmp_path / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    hwmon.mkdir(parents=True)
    for index, (label, mv, ma) in enumerate([("VDD_IN", 5000, 1200), ("VDD_CPU_GPU_CV", 5000, 300)], start=1):
        (hwmon / f"in{index}_label").write_text(label)
        (hwmon / f"in{index}_input").write_text(str(mv))
        (hwmon / f"curr{index}_input").write_text(str(ma))
    watts, source = energy.ina3221_power_fn(str(tmp_path))
    assert watts() == pytest.approx(6.0) and "VDD_IN" in source


def test_jetson_nano_iio_rails(tmp_path):
    device = tmp_path / "ina3221x" / "6-0040" / "iio:device0"
    device.mkdir(parents=True)
    for index, (name, mw) in enumerate([("POM_5V_IN", 4200), ("POM_5V_GPU", 400), ("POM_5V_CPU", 900)]):
        (device / f"rail_name_{index}").write_text(name)
        (device / f"in_power{index}_input").write_text(str(mw))
    watts, source = energy.ina3221_power_fn(str(tmp_path))
    assert watts() == pytest.approx(4.2) and "POM_5V_IN" in source


def test_rapl_counter_wraps(tmp_path):
    domain = tmp_path / "intel-rapl:0"
    domain.mkdir()
    (domain / "energy_uj").write_text(str(2**32 - 1_000_000))
    (domain / "max_energy_range_uj").write_text(str(2**32))
    joules, source = energy.rapl_energy_fn(str(tmp_path))
    (domain / "energy_uj").write_text("2000000")
    assert joules() == pytest.approx(3.0) and "rapl" in source


def test_power_model_estimate_is_labelled_and_bounded():
    meter = energy.EnergyMeter("none", idle_w=2.0, busy_w=6.0, cores=4)
    import time
    time.sleep(0.2)
    joules = meter.update(force=True)
    assert not meter.measured and meter.source.startswith("estimate")
    assert 2.0 * 0.2 * 0.9 <= joules <= 6.0 * 0.3


def test_schedule_maps_the_host_plan_onto_device_epochs():
    plan = dict(num_blocks=17, epochs_done=0, plan_epochs=30, freeze_epochs=[6, 8, 10, 12, 14],
                delta_tau=2, base_lr=0.1, update_fraction=0.3)
    # Stage 4 starts when block 3 freezes (host epoch 12 of 30 -> device epoch 4 of 10).
    assert schedule.device_schedule(stage_ks=[3, 4, 5], epochs=10, **plan).starts == [(3, 0), (4, 4), (5, 5)]
    # Stages past the plan are spread evenly; --freeze-at overrides.
    assert schedule.device_schedule(stage_ks=[14, 15, 16], epochs=3, **plan).starts == [(14, 0), (15, 1), (16, 2)]
    forced = schedule.device_schedule(stage_ks=[14, 15, 16], epochs=6, freeze_at=[2, 4], **plan)
    assert forced.starts == [(14, 0), (15, 2), (16, 4)]
    with pytest.raises(BundleError, match="one per later stage"):
        schedule.device_schedule(stage_ks=[14, 15, 16], epochs=6, freeze_at=[2], **plan)
    # 6 device epochs cover 30 plan epochs: block 14 trains until device epoch 2 = plan epoch 10.
    assert forced.active_epochs[14] == 10 and forced.active_epochs[15] == 20 and forced.active_epochs[16] == 30
    assert forced.lrs(0.0)[16] == pytest.approx(0.1) and forced.lrs(3.0)[16] == pytest.approx(0.05)
    assert forced.lrs(2.0)[14] == 0.0
    # Δτ scales with the plan (2 plan epochs = 0.2 device epochs -> 1), at least one epoch.
    assert schedule.device_schedule(stage_ks=[3], epochs=3, **plan).delta_tau == 1
    assert schedule.device_schedule(stage_ks=[3], epochs=30, **plan).delta_tau == 2
    assert schedule.device_schedule(stage_ks=[3], epochs=30, **plan).base_lr == 0.1
    # A finished plan (a trained checkpoint): fine-tune at a tenth of the LR over the device run.
    finished = schedule.device_schedule(stage_ks=[3], epochs=4, **{**plan, "epochs_done": 30})
    assert finished.plan.fine_tune and finished.base_lr == pytest.approx(0.01)
    assert finished.updates.fraction(0) == pytest.approx(0.3) and finished.updates.fraction(4) == 0.0


def test_imagefolder_skips_and_counts_corrupt_images(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 10), (i * 40, 0, 0)).save(tmp_path / name / f"{i}.jpg")
    (tmp_path / "dog" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "cat" / "empty.png").write_bytes(b"")
    data = load_imagefolder(tmp_path, 8, ["cat", "dog"])
    assert data.images.shape == (6, 3, 8, 8) and data.images.dtype == np.uint8
    assert sorted(data.skipped) == ["cat/empty.png", "dog/bad.jpg"]
    assert list(data.labels) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataError, match="do not match the bundle's"):
        load_imagefolder(tmp_path, 8, ["airplane", "ship", "truck"])


def test_stratified_split_is_fixed_and_disjoint():
    labels = np.repeat(np.arange(4), 10)
    train, val = stratified_split(labels, 0.2, seed=1)
    again = stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(val, again[1]) and not set(train) & set(val)
    assert np.bincount(labels[val]).tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("location", ["memory", "disk"])
def test_feature_cache_round_trip_and_transform(tmp_path, location):
    cache = FeatureCache(10, (2, 3), location, max_mb=1, directory=tmp_path)
    idx = np.array([1, 4, 7])
    assert not cache.lookup(idx).any()
    cache.put(idx, np.arange(18, dtype=np.float32).reshape(3, 2, 3))
    assert cache.lookup(np.array([4, 5])).tolist() == [True, False]
    cache.transform(lambda f: f.reshape(len(f), -1)[:, :4] * 2, feature_shape=(4,))
    np.testing.assert_array_equal(cache.get(np.array([4])), [[12, 14, 16, 18]])
    assert FeatureCache(1000, (64, 8, 8), location, max_mb=1, directory=tmp_path).enabled is False


def test_freed_large_arrays_go_back_to_the_system():
    """device_runner/allocator.py: after a 30 MB array is freed, glibc's default would serve a
    20 MB one from its heap and keep those pages; with the runner's fixed mmap threshold the
    20 MB come back when freed (the peak-RSS saving of docs/benchmarks.md §8)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from device_runner import allocator\n"
        "set_ = allocator.return_large_frees() if sys.argv[1] == 'set' else None\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024\n"
        "a = np.ones(30 << 18, np.float32); del a\n"
        "before = rss()\n"
        "b = np.ones(20 << 18, np.float32); del b\n"
        "print(set_, rss() - before)\n")
    kept = {}
    for mode in ("default", "set"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        flag, grown = out.stdout.split()
        kept[mode] = int(grown)
        if mode == "set":
            assert flag == "True"
    assert kept["default"] >= 15 and kept["set"] <= 2, kept
