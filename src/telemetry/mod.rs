//! Machine telemetry on its own thread at a fixed period: the memory pool and power draw,
//! sent as whole snapshots. A source that cannot be read says why instead of reporting 0.

pub mod power;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, RefreshKind, System};

pub use power::{Power, PowerProbe};

/// Sampling period: 4 Hz, fast enough for a live sparkline, cheap enough to be invisible.
pub const PERIOD: Duration = Duration::from_millis(250);

/// Where the memory pool's total comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// Apple silicon and GB10 (DGX Spark): CPU and GPU share one pool.
    Unified,
    /// System RAM.
    System,
    /// A cgroup memory limit below the machine's RAM (containers).
    Cgroup,
}

impl PoolKind {
    pub fn label(self) -> &'static str {
        match self {
            PoolKind::Unified => "unified memory",
            PoolKind::System => "system RAM",
            PoolKind::Cgroup => "cgroup limit",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Memory {
    pub kind: PoolKind,
    pub total: u64,
    /// Used by everything, this process included.
    pub used: u64,
    /// Resident memory of this process.
    pub process_rss: u64,
}

impl Memory {
    pub fn free(&self) -> u64 {
        self.total.saturating_sub(self.used)
    }

    /// Used by other processes.
    pub fn others(&self) -> u64 {
        self.used.saturating_sub(self.process_rss)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub at: Instant,
    pub memory: Memory,
    pub power: Power,
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

/// Reads memory and power; one call, one snapshot.
pub struct Sampler {
    sys: System,
    pid: Pid,
    power: PowerProbe,
}

impl Sampler {
    pub fn new(sysfs: PathBuf) -> Self {
        Self {
            sys: System::new_with_specifics(RefreshKind::nothing()),
            pid: Pid::from_u32(std::process::id()),
            power: PowerProbe::discover(&sysfs),
        }
    }

    pub fn sample(&mut self) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            memory: read_memory(&mut self.sys, self.pid),
            power: self.power.read(Instant::now()),
        }
    }
}

/// The memory pool now, as the memory pane shows it and the loader checks it: system
/// memory, or a cgroup limit below it; a cgroup nearly full counts even when its limit is
/// not below the machine's memory.
pub fn read_memory(sys: &mut System, pid: Pid) -> Memory {
    sys.refresh_memory();
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        false,
        ProcessRefreshKind::nothing().with_memory(),
    );
    let process_rss = sys.process(pid).map_or(0, |p| p.memory());
    let (mut kind, mut total, mut used) = (
        if cfg!(target_os = "macos") {
            PoolKind::Unified
        } else {
            PoolKind::System
        },
        sys.total_memory(),
        sys.used_memory(),
    );
    if let Some(cg) = sys.cgroup_limits() {
        if cg.total_memory > 0 && cg.total_memory < total {
            kind = PoolKind::Cgroup;
            total = cg.total_memory;
            used = cg.total_memory.saturating_sub(cg.free_memory);
        } else if cg.total_memory > 0 {
            used = used.max(total.saturating_sub(cg.free_memory));
        }
    }
    Memory {
        kind,
        total,
        used: used.max(process_rss),
        process_rss,
    }
}

/// Memory this process can still take.
pub fn available_memory() -> u64 {
    let mut sys = System::new_with_specifics(RefreshKind::nothing());
    read_memory(&mut sys, Pid::from_u32(std::process::id())).free()
}
