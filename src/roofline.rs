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

/// Measures read bandwidth with all cores summing a buffer far larger than the caches.
pub fn measure_bandwidth_gbs() -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = 256 << 20; // 256 MiB a thread
    let bufs: Vec<Vec<u64>> = (0..threads).map(|i| vec![i as u64 + 1; per / 8]).collect();
    let mut best = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let sums: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = bufs
                .iter()
                .map(|b| s.spawn(move || b.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        std::hint::black_box(sums);
        let gbs = (threads * per) as f64 / start.elapsed().as_secs_f64() / 1e9;
        best = best.max(gbs);
    }
    best
}

/// `tokentop probe`: measures this machine and saves it as a profile.
pub fn probe(save_to: &Path) -> Result<Profile> {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    let profile = Profile {
        name: "this machine".into(),
        bandwidth_gbs: (measure_bandwidth_gbs() * 10.0).round() / 10.0,
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
    Ok(profile)
}

#[cfg(test)]
mod tests {
    use super::*;

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
