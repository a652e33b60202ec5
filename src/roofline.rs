//! The roofline for decode: memory bandwidth / bytes read per token is the fastest a model
//! can generate on a machine; tokentop shows it beside the measured rate.

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

pub const BUILTIN: &str = include_str!("../hardware.toml");

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub bandwidth_gbs: f64,
    pub memory_gb: f64,
    /// Typical power under load or the TDP, watts (hardware.toml cites each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<f64>,
    /// Substrings of the NVML device name, the Apple chip name or the CPU model name that
    /// identify this machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detect: Vec<String>,
}

/// The profile whose `detect` strings match `machine` (case-insensitive).
pub fn detect(profiles: &[Profile], machine: &str) -> Option<usize> {
    let m = machine.to_lowercase();
    profiles.iter().position(|p| {
        p.detect
            .iter()
            .any(|d| !d.is_empty() && m.contains(&d.to_lowercase()))
    })
}

#[derive(Debug, Deserialize, Serialize)]
struct File {
    profile: Vec<Profile>,
}

pub fn parse(text: &str) -> Result<Vec<Profile>> {
    let f: File = toml::from_str(text).map_err(|e| anyhow!("invalid hardware profiles: {e}"))?;
    Ok(f.profile)
}

/// The published profiles, then this machine's if `tokentop probe` measured it.
pub fn profiles(local: Option<&Path>) -> Vec<Profile> {
    let mut out = Vec::new();
    if let Some(p) = local
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| parse(&t).ok())
    {
        out.extend(p);
    }
    out.extend(parse(BUILTIN).expect("built-in hardware.toml is valid"));
    out
}

/// Highest decode rate `bytes_per_token` allows at `bandwidth_gbs`.
pub fn ceiling(bandwidth_gbs: f64, bytes_per_token: f64) -> f64 {
    if bytes_per_token <= 0.0 {
        0.0
    } else {
        bandwidth_gbs * 1e9 / bytes_per_token
    }
}

/// Bytes of weights read per generated token: all of them for a dense model, the active
/// share for a mixture of experts.
pub fn bytes_per_token(weight_bytes: u64, active_fraction: f64) -> f64 {
    weight_bytes as f64 * active_fraction.clamp(0.0, 1.0)
}

/// Timed passes over the buffer, after one untimed pass that faults its pages in.
pub const PASSES: usize = 7;

/// The bandwidth passes of one probe, GB/s each.
#[derive(Debug, Clone, PartialEq)]
pub struct Bandwidth {
    pub passes: Vec<f64>,
    /// Bytes read per pass.
    pub bytes: u64,
}

impl Bandwidth {
    /// The best sustained rate: the fastest whole pass over a buffer no cache holds (a
    /// slower pass was disturbed by other work or frequency changes, not the memory's limit).
    pub fn best(&self) -> f64 {
        self.passes.iter().copied().fold(0.0, f64::max)
    }

    /// Slowest and fastest pass.
    pub fn spread(&self) -> (f64, f64) {
        let min = self.passes.iter().copied().fold(f64::INFINITY, f64::min);
        (if min.is_finite() { min } else { 0.0 }, self.best())
    }

    /// One line for `tokentop probe`: the best, then the spread of the passes.
    pub fn summary(&self) -> String {
        let (min, max) = self.spread();
        let pct = if max > 0.0 {
            (max - min) / max * 100.0
        } else {
            0.0
        };
        format!(
            "{:.1} GB/s read bandwidth (best of {} passes over {:.1} GiB; passes {:.1}–{:.1} GB/s, spread {:.0}%)",
            self.best(),
            self.passes.len(),
            self.bytes as f64 / (1u64 << 30) as f64,
            min,
            max,
            pct
        )
    }
}

/// A sysfs cache size ("491520K", "32M", "1024") in bytes.
pub fn parse_cache_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, mult) = match t.as_bytes().last()? {
        b'K' => (&t[..t.len() - 1], 1u64 << 10),
        b'M' => (&t[..t.len() - 1], 1 << 20),
        b'G' => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Bytes to read per pass: at least 1 GiB and 4x the last-level cache, so no cache holds
/// the buffer, but at most half the available memory; a multiple of `threads` words.
pub fn buffer_bytes(threads: usize, last_level_cache: Option<u64>, available: u64) -> u64 {
    let want = (1u64 << 30).max(last_level_cache.unwrap_or(0).saturating_mul(4));
    let bytes = want.min(available / 2).max(64 << 20);
    let unit = threads.max(1) as u64 * 8;
    bytes / unit * unit
}

/// The largest cache level sysfs lists for CPU 0 (Linux); `None` elsewhere.
fn last_level_cache() -> Option<u64> {
    (0..8)
        .filter_map(|i| {
            let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
            parse_cache_size(&std::fs::read_to_string(format!("{dir}/size")).ok()?)
        })
        .max()
}

/// Measures read bandwidth with all cores summing a buffer far larger than the caches,
/// [`PASSES`] times.
pub fn measure_bandwidth() -> Bandwidth {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bytes = buffer_bytes(
        threads,
        last_level_cache(),
        crate::telemetry::available_memory(),
    );
    let per = (bytes / threads as u64 / 8) as usize;
    let bufs: Vec<Vec<u64>> = (0..threads).map(|i| vec![i as u64 + 1; per]).collect();
    let pass = || {
        let start = Instant::now();
        let sums: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = bufs
                .iter()
                .map(|b| s.spawn(move || b.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        std::hint::black_box(sums);
        bytes as f64 / start.elapsed().as_secs_f64() / 1e9
    };
    pass();
    Bandwidth {
        passes: (0..PASSES).map(|_| pass()).collect(),
        bytes,
    }
}

/// `tokentop probe`: measures this machine and saves it as a profile.
pub fn probe(save_to: &Path) -> Result<(Profile, Bandwidth)> {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    let bw = measure_bandwidth();
    let profile = Profile {
        name: "this machine".into(),
        bandwidth_gbs: (bw.best() * 10.0).round() / 10.0,
        memory_gb: (sys.total_memory() as f64 / 1e9 * 10.0).round() / 10.0,
        power_w: None,
        detect: Vec::new(),
    };
    if let Some(dir) = save_to.parent() {
        crate::private::create_dir_all(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = toml::to_string(&File {
        profile: vec![profile.clone()],
    })?;
    std::fs::write(save_to, text).with_context(|| format!("writing {}", save_to.display()))?;
    Ok((profile, bw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_the_best_pass_and_the_spread() {
        // The passes the issue saw minutes apart: 49.9, 51.0, then 30–32 GB/s.
        let bw = Bandwidth {
            passes: vec![49.9, 51.0, 31.2, 30.4, 32.0],
            bytes: 2 << 30,
        };
        assert_eq!(bw.best(), 51.0);
        assert_eq!(bw.spread(), (30.4, 51.0));
        assert_eq!(
            bw.summary(),
            "51.0 GB/s read bandwidth (best of 5 passes over 2.0 GiB; passes 30.4–51.0 GB/s, spread 40%)"
        );
        let none = Bandwidth {
            passes: vec![],
            bytes: 0,
        };
        assert_eq!((none.best(), none.spread()), (0.0, (0.0, 0.0)));
    }

    #[test]
    fn probe_buffer_defeats_the_caches() {
        assert_eq!(parse_cache_size("491520K\n"), Some(480 << 20));
        assert_eq!(parse_cache_size("32M"), Some(32 << 20));
        assert_eq!(parse_cache_size("1024"), Some(1024));
        assert_eq!(parse_cache_size("lots"), None);
        let gib = 1u64 << 30;
        // At least 1 GiB, and 4x a big L3 (this machine's sysfs says 480 MiB).
        assert_eq!(buffer_bytes(16, Some(32 << 20), 100 * gib), gib);
        assert_eq!(buffer_bytes(2, Some(480 << 20), 20 * gib), 1920 << 20);
        // Never more than half of what is available, and split evenly across threads.
        assert_eq!(buffer_bytes(2, None, gib), gib / 2);
        assert_eq!(buffer_bytes(3, None, 100 * gib) % 24, 0);
    }

    #[test]
    fn ceilings() {
        // 4 GB of weights at 273 GB/s: 68 tokens/s at best.
        assert!((ceiling(273.0, bytes_per_token(4_000_000_000, 1.0)) - 68.25).abs() < 1e-9);
        // A MoE reading a tenth of its weights per token is ten times faster.
        assert!((ceiling(273.0, bytes_per_token(40_000_000_000, 0.1)) - 68.25).abs() < 1e-9);
        assert_eq!(ceiling(100.0, 0.0), 0.0);
    }

    #[test]
    fn builtin_profiles_include_the_issue_machines() {
        let p = profiles(None);
        let get = |n: &str| {
            p.iter()
                .find(|x| x.name == n)
                .map(|x| (x.bandwidth_gbs, x.memory_gb, x.power_w))
        };
        assert_eq!(get("Apple M5 Max"), Some((614.0, 128.0, Some(140.0))));
        assert_eq!(get("Apple M4 Max"), Some((546.0, 128.0, Some(140.0))));
        assert_eq!(get("DGX Spark"), Some((273.0, 128.0, Some(140.0))));
        assert_eq!(get("RTX 5090"), Some((1792.0, 32.0, Some(575.0))));
        assert_eq!(get("RTX Pro 6000"), Some((1792.0, 96.0, Some(600.0))));
        assert_eq!(get("Strix Halo"), Some((256.0, 128.0, Some(120.0))));
        for x in &p {
            assert!(x.name.len() <= 12, "{} is too long for the pane", x.name);
        }
    }

    #[test]
    fn detection_by_nvml_name_apple_chip_or_cpu_model() {
        let p = profiles(None);
        let name = |m: &str| detect(&p, m).map(|i| p[i].name.as_str());
        // NVML's name on a DGX Spark (nvidia-smi in NVIDIA/k8s-device-plugin#1482).
        assert_eq!(name("NVIDIA GB10"), Some("DGX Spark"));
        // nvidia-smi names of the two desktop cards.
        assert_eq!(name("NVIDIA GeForce RTX 5090"), Some("RTX 5090"));
        assert_eq!(
            name("NVIDIA RTX PRO 6000 Blackwell Workstation Edition"),
            Some("RTX Pro 6000")
        );
        // machdep.cpu.brand_string on Apple silicon.
        assert_eq!(name("Apple M5 Max"), Some("Apple M5 Max"));
        assert_eq!(name("Apple M4 Max"), Some("Apple M4 Max"));
        assert_eq!(name("Apple M4 Pro"), None);
        // /proc/cpuinfo model name on a Ryzen AI Max+ 395.
        assert_eq!(
            name("AMD RYZEN AI MAX+ 395 w/ Radeon 8060S"),
            Some("Strix Halo")
        );
        assert_eq!(name("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"), None);
    }
}
