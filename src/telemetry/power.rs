//! Power draw from Linux sysfs: RAPL energy counters (powercap), hwmon power sensors, or a
//! battery's discharge rate, tried in that order. Read by hand because no maintained crate
//! covers these three sysfs interfaces together; each is a file holding one integer.

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
    /// Cumulative energy counters, one per package domain, each with its wrap range.
    Rapl {
        domains: Vec<(PathBuf, u64)>,
        last: Option<(Instant, Vec<u64>)>,
    },
    /// A sensor reporting microwatts directly.
    Microwatts {
        path: PathBuf,
        name: String,
    },
    None(String),
}

#[derive(Debug)]
pub struct PowerProbe {
    source: Source,
}

fn read_u64(p: &Path) -> Option<u64> {
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
        let mut reasons = Vec::new();
        let powercap = sysfs.join("class/powercap");
        let mut domains = Vec::new();
        let mut unreadable = false;
        if let Ok(entries) = std::fs::read_dir(&powercap) {
            let mut names: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            names.sort();
            for dir in names {
                let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
                // Top-level package domains only ("intel-rapl:0"), not their sub-zones.
                if !(name.starts_with("intel-rapl:") || name.starts_with("amd-rapl:"))
                    || name.matches(':').count() != 1
                {
                    continue;
                }
                let energy = dir.join("energy_uj");
                match (
                    read_u64(&energy),
                    read_u64(&dir.join("max_energy_range_uj")),
                ) {
                    (Some(_), Some(range)) => domains.push((energy, range)),
                    _ if energy.exists() => unreadable = true,
                    _ => {}
                }
            }
            if domains.is_empty() {
                reasons.push(if unreadable {
                    "RAPL energy counters exist but are not readable (root only on this kernel)"
                        .to_string()
                } else {
                    "no RAPL package domain in powercap".to_string()
                });
            }
        } else {
            reasons.push("no powercap (RAPL) interface".into());
        }
        if !domains.is_empty() {
            return Self {
                source: Source::Rapl {
                    domains,
                    last: None,
                },
            };
        }
        if let Some((path, name)) = find_microwatts(sysfs) {
            return Self {
                source: Source::Microwatts { path, name },
            };
        }
        reasons.push("no hwmon power sensor or battery power reading".into());
        Self {
            source: Source::None(reasons.join("; ")),
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
            Source::Rapl { domains, last } => {
                let Some(values) = domains
                    .iter()
                    .map(|(p, _)| read_u64(p))
                    .collect::<Option<Vec<u64>>>()
                else {
                    return Power::Unavailable("RAPL counters stopped answering".into());
                };
                let power = match last.as_ref() {
                    None => Power::Unavailable("RAPL: first reading, rate after the next".into()),
                    Some((t0, before)) => {
                        let dt = now.duration_since(*t0).as_secs_f64();
                        let uj: u64 = before
                            .iter()
                            .zip(&values)
                            .zip(domains.iter())
                            .map(|((b, a), (_, range))| energy_delta(*b, *a, *range))
                            .sum();
                        if dt <= 0.0 {
                            Power::Unavailable("RAPL: no time between readings".into())
                        } else {
                            Power::Watts {
                                watts: uj as f64 / 1e6 / dt,
                                source: "RAPL package".into(),
                            }
                        }
                    }
                };
                *last = Some((now, values));
                power
            }
        }
    }
}

fn find_microwatts(sysfs: &Path) -> Option<(PathBuf, String)> {
    let mut candidates = Vec::new();
    if let Ok(entries) = std::fs::read_dir(sysfs.join("class/hwmon")) {
        for e in entries.flatten() {
            for f in ["power1_input", "power1_average"] {
                let p = e.path().join(f);
                if read_u64(&p).is_some() {
                    let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                    candidates.push((p, format!("hwmon {}", name.trim())));
                    break;
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(sysfs.join("class/power_supply")) {
        for e in entries.flatten() {
            let p = e.path().join("power_now");
            if e.file_name().to_string_lossy().starts_with("BAT") && read_u64(&p).is_some() {
                candidates.push((p, "battery discharge".into()));
            }
        }
    }
    candidates.sort();
    candidates.into_iter().next()
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
