//! RAPL package energy counters (Linux powercap): cumulative microjoules per package domain,
//! each wrapping at its own range. Read by hand: one integer a file, no crate covers it.

use super::power::{energy_delta, read_u64, Power};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug)]
pub struct Rapl {
    domains: Vec<(PathBuf, u64)>,
    last: Option<(Instant, Vec<u64>)>,
}

impl Rapl {
    /// Finds the readable package domains under `sysfs`, or says why there are none.
    pub fn discover(sysfs: &Path) -> Result<Self, String> {
        let powercap = sysfs.join("class/powercap");
        let Ok(entries) = std::fs::read_dir(&powercap) else {
            return Err("no powercap (RAPL) interface".into());
        };
        let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        let mut domains = Vec::new();
        let mut unreadable = false;
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
            return Err(if unreadable {
                "RAPL energy counters exist but are not readable (root only on this kernel)".into()
            } else {
                "no RAPL package domain in powercap".into()
            });
        }
        Ok(Self {
            domains,
            last: None,
        })
    }

    pub fn read(&mut self, now: Instant) -> Power {
        let Some(values) = self
            .domains
            .iter()
            .map(|(p, _)| read_u64(p))
            .collect::<Option<Vec<u64>>>()
        else {
            return Power::Unavailable("RAPL counters stopped answering".into());
        };
        let power = match self.last.as_ref() {
            None => Power::Unavailable("RAPL: first reading, rate after the next".into()),
            Some((t0, before)) => {
                let dt = now.duration_since(*t0).as_secs_f64();
                let uj: u64 = before
                    .iter()
                    .zip(&values)
                    .zip(self.domains.iter())
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
        self.last = Some((now, values));
        power
    }
}
