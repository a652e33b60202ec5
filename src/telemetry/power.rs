//! Power draw: the sensor J/token is computed from, best first. NVML (GPU energy counter)
//! and macmon (Apple package) are chosen by the sampler when present; this probe covers the
//! system sources: RAPL package counters, a hwmon power sensor, then the battery's discharge.

use super::battery::{self, Battery};
use super::hwmon;
use super::rapl::Rapl;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, PartialEq)]
pub enum Power {
    Watts {
        watts: f64,
        source: String,
    },
    /// No reading, and why (never shown as 0 W).
    Unavailable(String),
}

impl Power {
    pub fn watts(&self) -> Option<f64> {
        match self {
            Power::Watts { watts, .. } => Some(*watts),
            Power::Unavailable(_) => None,
        }
    }
}

#[derive(Debug)]
enum Source {
    Rapl(Rapl),
    /// A sensor reporting microwatts directly.
    Microwatts {
        path: PathBuf,
        name: String,
    },
    /// The battery's discharge, when nothing better exists.
    Battery(PathBuf),
    None(String),
}

#[derive(Debug)]
pub struct PowerProbe {
    source: Source,
}

pub(crate) fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Energy consumed between two readings of a counter that wraps at `range`.
pub fn energy_delta(before: u64, after: u64, range: u64) -> u64 {
    if after >= before {
        after - before
    } else {
        range.saturating_sub(before) + after
    }
}

impl PowerProbe {
    /// Looks for a readable source under `sysfs` (normally `/sys`).
    pub fn discover(sysfs: &Path) -> Self {
        let rapl_reason = match Rapl::discover(sysfs) {
            Ok(r) => {
                return Self {
                    source: Source::Rapl(r),
                }
            }
            Err(reason) => reason,
        };
        if let Some((path, name)) = hwmon::find(sysfs) {
            return Self {
                source: Source::Microwatts { path, name },
            };
        }
        if let Battery::Reading(_) = battery::read_sysfs(sysfs) {
            return Self {
                source: Source::Battery(sysfs.to_path_buf()),
            };
        }
        Self {
            source: Source::None(format!(
                "{rapl_reason}; no hwmon power sensor or battery power reading"
            )),
        }
    }

    pub fn read(&mut self, now: Instant) -> Power {
        match &mut self.source {
            Source::None(reason) => Power::Unavailable(reason.clone()),
            Source::Microwatts { path, name } => match read_u64(path) {
                Some(uw) => Power::Watts {
                    watts: uw as f64 / 1e6,
                    source: name.clone(),
                },
                None => Power::Unavailable(format!("{} stopped answering", path.display())),
            },
            Source::Battery(sysfs) => match battery::read_sysfs(sysfs) {
                b @ Battery::Reading(_) => match b.discharge_watts() {
                    Some(w) => Power::Watts {
                        watts: w,
                        source: "battery discharge".into(),
                    },
                    None => Power::Unavailable(
                        "only the battery measures power, and it is not discharging".into(),
                    ),
                },
                Battery::Unavailable(r) => Power::Unavailable(r),
            },
            Source::Rapl(r) => r.read(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn write(root: &Path, rel: &str, v: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, v).unwrap();
    }

    #[test]
    fn wraparound() {
        assert_eq!(energy_delta(100, 350, 1000), 250);
        assert_eq!(energy_delta(900, 50, 1000), 150);
    }

    #[test]
    fn rapl_rate_from_two_readings_with_wrap() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "class/powercap/intel-rapl:0/energy_uj",
            "999000000",
        );
        write(
            d.path(),
            "class/powercap/intel-rapl:0/max_energy_range_uj",
            "1000000000",
        );
        write(d.path(), "class/powercap/intel-rapl:0:0/energy_uj", "5");
        let mut probe = PowerProbe::discover(d.path());
        let t0 = Instant::now();
        assert!(matches!(probe.read(t0), Power::Unavailable(r) if r.contains("first reading")));
        // 2 J (1 J to the wrap, 1 J after) in 0.5 s = 4 W; the sub-zone is not added.
        write(d.path(), "class/powercap/intel-rapl:0/energy_uj", "1000000");
        let p = probe.read(t0 + Duration::from_millis(500));
        assert_eq!(
            p.watts().map(|w| (w * 1000.0).round() / 1000.0),
            Some(4.0),
            "{p:?}"
        );
    }

    #[test]
    fn hwmon_then_battery_then_an_honest_reason() {
        let d = tempfile::tempdir().unwrap();
        let mut probe = PowerProbe::discover(d.path());
        match probe.read(Instant::now()) {
            Power::Unavailable(r) => {
                assert!(r.contains("no powercap") && r.contains("no hwmon"), "{r}")
            }
            p => panic!("{p:?}"),
        }
        write(d.path(), "class/power_supply/BAT0/power_now", "12500000");
        write(d.path(), "class/power_supply/BAT0/status", "Discharging");
        let mut probe = PowerProbe::discover(d.path());
        assert_eq!(probe.read(Instant::now()).watts(), Some(12.5));
        write(d.path(), "class/hwmon/hwmon3/power1_input", "45000000");
        write(d.path(), "class/hwmon/hwmon3/name", "amdgpu");
        let mut probe = PowerProbe::discover(d.path());
        let p = probe.read(Instant::now());
        assert!(
            matches!(&p, Power::Watts { watts, source } if *watts == 45.0 && source == "hwmon amdgpu"),
            "{p:?}"
        );
    }

    #[test]
    fn unreadable_rapl_says_so() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "class/powercap/intel-rapl:0/max_energy_range_uj",
            "1000",
        );
        std::fs::create_dir_all(d.path().join("class/powercap/intel-rapl:0/energy_uj")).unwrap();
        let mut probe = PowerProbe::discover(d.path());
        assert!(
            matches!(probe.read(Instant::now()), Power::Unavailable(r) if r.contains("not readable"))
        );
    }
}
