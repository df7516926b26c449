"""Energy of the run: a real sensor when the board has one, else the profile's power model.

Sources, tried in this order when the profile says ``sensor: auto``:

* ``ina3221``: Jetson power monitors in sysfs. Jetson Nano (L4T 32) exposes
  ``in_power<N>_input`` (mW) under ``/sys/bus/i2c/drivers/ina3221x/*/iio:device*``; Orin
  (L4T 35+) exposes hwmon ``in<N>_input`` (mV) and ``curr<N>_input`` (mA) with labels. The
  board-input rail (``POM_5V_IN`` / ``VDD_IN``) is used, else the sum of the rails.
* ``rpi5-pmic``: ``vcgencmd pmic_read_adc`` on a Raspberry Pi 5; the sum of V×I over the
  PMIC rails (the SoC and memory rails: it does not see USB devices or the 5 V input).
* ``rapl``: Intel RAPL package energy counters in ``/sys/class/powercap`` (often root only).
* otherwise an **estimate**: ``idle_w + (busy_w - idle_w) × utilisation``, utilisation being
  this process's CPU time over wall time and the board's cores.

Readings (at most every 0.5 s for vcgencmd) are integrated when :meth:`EnergyMeter.update` is
called (after every step).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import time

import psutil


def _read(path: str) -> float | None:
    try:
        with open(path) as handle:
            return float(handle.read().strip())
    except (OSError, ValueError):
        return None


def ina3221_power_fn(root: str = "/sys/bus/i2c/drivers"):
    """A function returning watts from Jetson INA3221 monitors, or None if there are none."""
    iio = sorted(glob.glob(f"{root}/ina3221x/*/iio:device*/in_power0_input"))
    if iio:
        folder = os.path.dirname(iio[0])
        rails = sorted(glob.glob(f"{folder}/in_power*_input"))
        names = {p: (_read_text(p.replace("in_power", "rail_name_").replace("_input", "")) or "") for p in rails}
        board = [p for p, n in names.items() if "5V_IN" in n or n.endswith("IN")]
        chosen = board[:1] or rails

        def iio_watts():
            values = [_read(p) for p in chosen]
            return None if None in values else sum(values) / 1000.0
        return iio_watts, f"ina3221 ({', '.join(names[p] or os.path.basename(p) for p in chosen)})"
    channels = []
    for hwmon in sorted(glob.glob(f"{root}/ina3221/*/hwmon/hwmon*")):
        for volt in sorted(glob.glob(f"{hwmon}/in[0-9]_input")):
            index = re.search(r"in(\d)_input", volt).group(1)
            current = f"{hwmon}/curr{index}_input"
            label = _read_text(f"{hwmon}/in{index}_label") or f"in{index}"
            if os.path.exists(current) and "sum" not in label.lower():
                channels.append((label, volt, current))
    if channels:
        board = [c for c in channels if c[0] in ("VDD_IN", "POM_5V_IN")]
        chosen = board[:1] or channels

        def hwmon_watts():
            total = 0.0
            for _, volt, current in chosen:
                v, i = _read(volt), _read(current)
                if v is None or i is None:
                    return None
                total += v * i / 1e6
            return total
        return hwmon_watts, f"ina3221 ({', '.join(c[0] for c in chosen)})"
    return None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def parse_pmic(text: str) -> float | None:
    """Watts from ``vcgencmd pmic_read_adc`` output (pairs ``X_A current(..)=`` / ``X_V volt(..)=``)."""
    amps, volts = {}, {}
    for name, kind, value in re.findall(r"(\w+)_([AV])\s+\w+\(\d+\)=([\d.]+)", text):
        (amps if kind == "A" else volts)[name] = float(value)
    rails = set(amps) & set(volts)
    return sum(amps[r] * volts[r] for r in rails) if rails else None


def pmic_power_fn():
    tool = shutil.which("vcgencmd")
    if tool is None:
        return None

    def pmic_watts():
        try:
            out = subprocess.run([tool, "pmic_read_adc"], capture_output=True, text=True, timeout=2).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return parse_pmic(out)
    return (pmic_watts, "rpi5-pmic (vcgencmd pmic_read_adc, SoC/memory rails)") if pmic_watts() else None


def rapl_energy_fn(root: str = "/sys/class/powercap"):
    """A function returning cumulative joules (package domains), handling counter wrap."""
    domains = [d for d in sorted(glob.glob(f"{root}/intel-rapl:[0-9]"))
               if _read(f"{d}/energy_uj") is not None]
    if not domains:
        return None
    ranges = [(_read(f"{d}/max_energy_range_uj") or 2**32) for d in domains]
    last = [_read(f"{d}/energy_uj") for d in domains]
    total = [0.0]

    def rapl_joules():
        for i, d in enumerate(domains):
            now = _read(f"{d}/energy_uj")
            if now is None:
                continue
            delta = now - last[i]
            if delta < 0:
                delta += ranges[i]
            total[0] += delta / 1e6
            last[i] = now
        return total[0]
    return rapl_joules, f"rapl ({len(domains)} package domain(s))"


class EnergyMeter:
    """Cumulative joules since start (plus ``offset_j`` carried over by a resumed run)."""

    def __init__(self, sensor: str, idle_w: float, busy_w: float, cores: int,
                 offset_j: float = 0.0):
        self.idle_w, self.busy_w, self.cores = idle_w, busy_w, max(1, cores)
        self.joules = float(offset_j)
        self._power = self._counter = None
        found = None
        order = {"auto": ("ina3221", "rpi5-pmic", "rapl"), "none": ()}.get(sensor, (sensor,))
        for name in order:
            found = {"ina3221": ina3221_power_fn, "rpi5-pmic": pmic_power_fn,
                     "rapl": rapl_energy_fn}[name]()
            if found:
                if name == "rapl":
                    self._counter = found[0]
                    self._counter_total = 0.0
                else:
                    self._power = found[0]
                break
        # Reading a sysfs file or CPU times is cheap; vcgencmd forks a process.
        self.min_interval_s = 0.5 if self._power is not None and "pmic" in found[1] else 0.0 if not found else 0.05
        if found:
            self.source, self.measured = found[1], True
        else:
            self.source = (f"estimate: power model idle {idle_w:g} W + ({busy_w:g} - {idle_w:g}) W "
                           f"x CPU utilisation over {self.cores} cores")
            self.measured = False
        self._process = psutil.Process()
        self._last_t = time.monotonic()
        self._last_cpu = self._cpu()
        self._last_w = self._power() if self._power else None

    def _cpu(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system

    def update(self, force: bool = False) -> float:
        now = time.monotonic()
        elapsed = now - self._last_t
        if elapsed < self.min_interval_s and not force:
            return self.joules
        if self._counter is not None:
            self.joules += self._counter_delta()
        elif self._power is not None:
            watts = self._power()
            if watts is not None and self._last_w is not None:
                self.joules += 0.5 * (watts + self._last_w) * elapsed
            self._last_w = watts
        else:
            cpu = self._cpu()
            utilisation = min(1.0, max(0.0, (cpu - self._last_cpu) / (elapsed * self.cores))) if elapsed > 0 else 0.0
            self.joules += (self.idle_w + (self.busy_w - self.idle_w) * utilisation) * elapsed
            self._last_cpu = cpu
        self._last_t = now
        return self.joules

    def _counter_delta(self) -> float:
        before = getattr(self, "_counter_total", None)
        total = self._counter()
        self._counter_total = total
        return 0.0 if before is None else total - before
