//! Apple silicon: the chip and the GPU's wired-memory limit from `sysctl`, power from
//! `macmon pipe` (IOReport energy counters, no sudo) when macmon is installed. No maintained
//! crate reads IOReport for us, so we run macmon; the parsers are pure functions over its
//! text so they are tested on recorded output here.

use serde::Deserialize;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// What `sysctl hw.memsize iogpu.wired_limit_mb machdep.cpu.brand_string` says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sysctl {
    pub memsize: Option<u64>,
    /// None where the key does not exist (Intel Macs, macOS before 14); 0 means the default.
    pub wired_limit_mb: Option<u64>,
    pub brand: Option<String>,
}

/// `name: value` lines, as `sysctl NAME…` prints them.
pub fn parse_sysctl(text: &str) -> Sysctl {
    let mut s = Sysctl::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "hw.memsize" => s.memsize = v.parse().ok(),
            "iogpu.wired_limit_mb" => s.wired_limit_mb = v.parse().ok(),
            "machdep.cpu.brand_string" => s.brand = Some(v.to_string()),
            _ => {}
        }
    }
    s
}

/// Share of RAM macOS lets Metal wire for the GPU when `iogpu.wired_limit_mb` is 0: about
/// three quarters on the large-memory machines this is for (Metal's
/// recommendedMaxWorkingSetSize reports ~96 GB on a 128 GB Mac).
pub const DEFAULT_WIRED_SHARE: f64 = 0.75;

/// The GPU's wired-memory limit in bytes, and whether it is macOS's default.
pub fn wired_limit(s: &Sysctl) -> Option<(u64, bool)> {
    let mem = s.memsize?;
    Some(match s.wired_limit_mb {
        Some(mb) if mb > 0 => ((mb << 20).min(mem), false),
        _ => ((mem as f64 * DEFAULT_WIRED_SHARE) as u64, true),
    })
}

/// Reads the sysctl values once (they do not change while we run).
pub fn read_sysctl() -> Option<Sysctl> {
    let out = Command::new("sysctl")
        .args([
            "hw.memsize",
            "iogpu.wired_limit_mb",
            "machdep.cpu.brand_string",
        ])
        .output()
        .ok()?;
    // sysctl exits 1 when one name is unknown but still prints the others.
    Some(parse_sysctl(&String::from_utf8_lossy(&out.stdout)))
}

/// The power fields of one `macmon pipe` JSON line (both the 0.6/0.7 and the 0.8 formats
/// carry these names).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MacmonSample {
    pub cpu_power: f64,
    pub gpu_power: f64,
    #[serde(default)]
    pub ane_power: f64,
    /// CPU + GPU + ANE: the package.
    pub all_power: f64,
    /// The whole machine, when the SMC reports it.
    #[serde(default)]
    pub sys_power: Option<f64>,
    #[serde(default)]
    pub ram_power: Option<f64>,
}

pub fn parse_macmon_line(line: &str) -> Result<MacmonSample, String> {
    serde_json::from_str(line).map_err(|e| format!("macmon pipe: {e}"))
}

/// `macmon pipe` running beside us; its latest sample is kept for the telemetry thread.
pub struct Macmon {
    child: Child,
    latest: Arc<Mutex<Result<MacmonSample, String>>>,
}

impl Macmon {
    pub fn spawn() -> Result<Self, String> {
        let mut child = Command::new("macmon")
            .args(["pipe", "-i", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|_| "macmon not installed (brew install macmon)".to_string())?;
        let stdout = child.stdout.take().ok_or("macmon gave no output")?;
        let latest = Arc::new(Mutex::new(Err("macmon: first sample pending".to_string())));
        let slot = latest.clone();
        std::thread::Builder::new()
            .name("tokentop-macmon".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut s) = slot.lock() {
                        *s = parse_macmon_line(&line);
                    }
                }
                if let Ok(mut s) = slot.lock() {
                    *s = Err("macmon stopped".into());
                }
            })
            .map_err(|e| format!("macmon reader: {e}"))?;
        Ok(Self { child, latest })
    }

    pub fn latest(&self) -> Result<MacmonSample, String> {
        self.latest
            .lock()
            .map_err(|_| "macmon reader failed".to_string())?
            .clone()
    }
}

impl Drop for Macmon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
