//! Machine telemetry on its own thread at a fixed period: the memory pool, power draw, the
//! GPU and the battery, sent as whole snapshots. One module per source; a source that
//! cannot be read says why instead of reporting 0.

pub mod apple;
pub mod battery;
pub mod gb10;
pub mod hwmon;
pub mod memory;
pub mod nvml;
pub mod power;
pub mod rapl;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, RefreshKind, System};

pub use battery::{Battery, BatteryReading, BatteryUse, Charge};
pub use memory::{available_memory, read_memory, GpuMemory, Memory, PoolKind};
pub use nvml::{GpuQuery, GpuReading};
pub use power::{Power, PowerProbe};

/// Sampling period: 4 Hz, fast enough for a live sparkline, cheap enough to be invisible.
pub const PERIOD: Duration = Duration::from_millis(250);

/// The GPU's state as the power pane shows it (NVML).
#[derive(Debug, Clone, PartialEq)]
pub struct GpuStats {
    pub name: String,
    pub utilization_pct: Option<u32>,
    pub graphics_mhz: Option<u32>,
    pub memory_mhz: Option<u32>,
    pub temperature_c: Option<u32>,
}

/// What the panes show beside the pool and the main power reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Details {
    pub gpu_memory: GpuMemory,
    /// The NVIDIA GPU, or why there is none.
    pub gpu: Result<GpuStats, String>,
    /// Power split by part (Apple: CPU, GPU, ANE), watts.
    pub parts: Vec<(&'static str, f64)>,
    pub battery: Battery,
    /// What identifies this machine: the NVML device name, the Apple chip, or the CPU model.
    pub machine: Option<String>,
}

impl Default for Details {
    fn default() -> Self {
        Self {
            gpu_memory: GpuMemory::default(),
            gpu: Err("no reading yet".into()),
            parts: Vec::new(),
            battery: Battery::default(),
            machine: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub at: Instant,
    pub memory: Memory,
    pub power: Power,
    pub details: Details,
}

/// Everything read in one tick, before it is turned into a snapshot.
#[derive(Debug, Clone)]
pub struct Readings {
    pub at: Instant,
    /// The OS's total and available memory, bytes.
    pub os_memory: (u64, u64),
    /// A cgroup's (limit, available: limit minus non-reclaimable usage), when there is one.
    pub cgroup: Option<(u64, u64)>,
    pub process_rss: u64,
    pub os_kind: PoolKind,
    pub gpu: Result<GpuReading, String>,
    pub macmon: Result<apple::MacmonSample, String>,
    pub sysctl: Option<apple::Sysctl>,
    /// RAPL, hwmon or battery, from [`PowerProbe`].
    pub system_power: Power,
    pub battery: Battery,
    pub cpu_model: Option<String>,
}

/// Turns one tick's readings into a snapshot: the GPU's energy counter is the power source
/// when there is one, then macmon's package power, then the system probe, then the
/// battery's discharge.
pub fn assemble(r: Readings, gpu_power: &mut gb10::GpuPower) -> Snapshot {
    let kind = match &r.gpu {
        Ok(g) => gb10::pool_kind(g, r.os_kind),
        Err(_) => r.os_kind,
    };
    let memory = memory::pool(kind, r.os_memory.0, r.os_memory.1, r.cgroup, r.process_rss);
    let gpu_memory = match (&r.gpu, r.sysctl.as_ref().and_then(apple::wired_limit)) {
        (Ok(g), _) => gb10::gpu_memory(g),
        (Err(_), Some((bytes, default))) => GpuMemory::WiredLimit { bytes, default },
        (Err(reason), None) => GpuMemory::Unavailable(reason.clone()),
    };
    let nvml_power = r.gpu.as_ref().ok().map(|g| gpu_power.read(g, r.at));
    let mut parts = Vec::new();
    let power = match (nvml_power, &r.macmon) {
        (Some(p @ Power::Watts { .. }), _) => p,
        (_, Ok(m)) => {
            parts = vec![
                ("CPU", m.cpu_power),
                ("GPU", m.gpu_power),
                ("ANE", m.ane_power),
            ];
            Power::Watts {
                watts: m.all_power,
                source: "package (macmon)".into(),
            }
        }
        (_, Err(reason)) if r.system_power.watts().is_none() && cfg!(target_os = "macos") => {
            match &r.system_power {
                Power::Unavailable(sys) => Power::Unavailable(format!("{reason}; {sys}")),
                p => p.clone(),
            }
        }
        _ => r.system_power.clone(),
    };
    // Nothing better: the battery's discharge (the probe already tries it on Linux; this
    // covers macOS without macmon).
    let power = match (&power, r.battery.discharge_watts()) {
        (Power::Unavailable(_), Some(watts)) => Power::Watts {
            watts,
            source: "battery discharge".into(),
        },
        _ => power,
    };
    let gpu = r.gpu.as_ref().map_err(Clone::clone).map(|g| GpuStats {
        name: g.name.clone(),
        utilization_pct: g.utilization_pct.clone().ok(),
        graphics_mhz: g.graphics_mhz.clone().ok(),
        memory_mhz: g.memory_mhz.clone().ok(),
        temperature_c: g.temperature_c.clone().ok(),
    });
    let machine = r
        .gpu
        .as_ref()
        .ok()
        .map(|g| g.name.clone())
        .or_else(|| r.sysctl.as_ref().and_then(|s| s.brand.clone()))
        .or(r.cpu_model);
    Snapshot {
        at: r.at,
        memory,
        power,
        details: Details {
            gpu_memory,
            gpu,
            parts,
            battery: r.battery,
            machine,
        },
    }
}

/// The `model name` line of /proc/cpuinfo (x86; ARM kernels often have none).
pub fn parse_cpuinfo_model(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_string())
    })
}

/// Owns the telemetry thread; dropping it stops the thread.
pub struct TelemetryHandle {
    pub snapshots: Receiver<Snapshot>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TelemetryHandle {
    pub fn spawn(sysfs: PathBuf) -> Self {
        let (tx, snapshots) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tokentop-telemetry".into())
            .spawn(move || {
                let mut sampler = Sampler::new(sysfs);
                while !flag.load(Ordering::Relaxed) {
                    if tx.send(sampler.sample()).is_err() {
                        return;
                    }
                    std::thread::sleep(PERIOD);
                }
            })
            .expect("spawning the telemetry thread");
        Self {
            snapshots,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TelemetryHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Battery readings on macOS run `ioreg`; every this many ticks is often enough.
const MAC_BATTERY_EVERY: u32 = 8;

/// Reads every source; one call, one snapshot.
pub struct Sampler {
    sys: System,
    pid: Pid,
    sysfs: PathBuf,
    power: PowerProbe,
    gpu: Result<Box<dyn GpuQuery>, String>,
    gpu_power: gb10::GpuPower,
    macmon: Result<apple::Macmon, String>,
    sysctl: Option<apple::Sysctl>,
    cpu_model: Option<String>,
    battery: Battery,
    tick: u32,
}

impl Sampler {
    pub fn new(sysfs: PathBuf) -> Self {
        let mac = cfg!(target_os = "macos");
        let gpu: Result<Box<dyn GpuQuery>, String> = if mac {
            Err("Apple GPU (Metal), no NVML".into())
        } else {
            nvml::NvmlGpu::open().map(|g| Box::new(g) as Box<dyn GpuQuery>)
        };
        Self {
            sys: System::new_with_specifics(RefreshKind::nothing()),
            pid: Pid::from_u32(std::process::id()),
            power: PowerProbe::discover(&sysfs),
            sysfs,
            gpu,
            gpu_power: gb10::GpuPower::default(),
            macmon: if mac {
                apple::Macmon::spawn()
            } else {
                Err("macmon is for macOS".into())
            },
            sysctl: mac.then(apple::read_sysctl).flatten(),
            cpu_model: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|t| parse_cpuinfo_model(&t)),
            battery: Battery::default(),
            tick: 0,
        }
    }

    pub fn sample(&mut self) -> Snapshot {
        let at = Instant::now();
        self.sys.refresh_memory();
        self.sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[self.pid]),
            false,
            ProcessRefreshKind::nothing().with_memory(),
        );
        let os_memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| memory::parse_meminfo(&t))
            .unwrap_or((self.sys.total_memory(), self.sys.available_memory()));
        if !cfg!(target_os = "macos") || self.tick.is_multiple_of(MAC_BATTERY_EVERY) {
            self.battery = battery::read(&self.sysfs);
        }
        self.tick = self.tick.wrapping_add(1);
        let readings = Readings {
            at,
            os_memory,
            cgroup: memory::cgroup_now(),
            process_rss: self.sys.process(self.pid).map_or(0, |p| p.memory()),
            os_kind: memory::os_pool_kind(),
            gpu: match &mut self.gpu {
                Ok(g) => Ok(g.read()),
                Err(e) => Err(e.clone()),
            },
            macmon: match &self.macmon {
                Ok(m) => m.latest(),
                Err(e) => Err(e.clone()),
            },
            sysctl: self.sysctl.clone(),
            system_power: self.power.read(at),
            battery: self.battery.clone(),
            cpu_model: self.cpu_model.clone(),
        };
        assemble(readings, &mut self.gpu_power)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_reads_this_machine_and_says_what_it_lacks() {
        let mut s = Sampler::new(PathBuf::from("/sys"));
        let a = s.sample();
        let b = s.sample();
        assert!(a.memory.total > 0 && a.memory.used <= a.memory.total);
        assert!(b.memory.process_rss > 0);
        // Whatever this machine has, every absent source carries a reason, never a 0.
        match &b.details.gpu {
            Ok(g) => assert!(!g.name.is_empty()),
            Err(reason) => assert!(!reason.is_empty()),
        }
        if let Power::Unavailable(reason) = &b.power {
            assert!(!reason.is_empty());
        }
        if let Battery::Unavailable(reason) = &b.details.battery {
            assert!(!reason.is_empty());
        }
    }

    #[test]
    fn cpuinfo_model_name() {
        // /proc/cpuinfo of a Ryzen AI Max+ 395 (the line as Linux prints it).
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD RYZEN AI MAX+ 395 w/ Radeon 8060S\n";
        assert_eq!(
            parse_cpuinfo_model(text).as_deref(),
            Some("AMD RYZEN AI MAX+ 395 w/ Radeon 8060S")
        );
        // aarch64 kernels (Grace, GB10) print no model name.
        assert_eq!(
            parse_cpuinfo_model("processor\t: 0\nBogoMIPS\t: 2000.00\n"),
            None
        );
    }
}
