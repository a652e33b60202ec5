//! The memory pool: system RAM, a cgroup limit below it, or unified memory shared with the
//! GPU (Apple silicon, GB10), and what the GPU may use of it.

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, RefreshKind, System};

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
            PoolKind::Unified => "unified",
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

/// What the GPU has or may take, shown under the pool.
#[derive(Debug, Clone, PartialEq)]
pub enum GpuMemory {
    /// No GPU memory source, and why.
    Unavailable(String),
    /// A discrete GPU's own memory (NVML).
    Dedicated { used: u64, total: u64 },
    /// Unified memory: the GPU's share of the pool (NVML's per-process memory on GB10).
    Share { used: u64 },
    /// Apple: how much of the pool Metal may wire for the GPU; `default` when
    /// `iogpu.wired_limit_mb` is 0 (macOS's own limit, about three quarters of RAM).
    WiredLimit { bytes: u64, default: bool },
}

impl Default for GpuMemory {
    fn default() -> Self {
        GpuMemory::Unavailable("no GPU reading yet".into())
    }
}

/// MemTotal and MemAvailable from /proc/meminfo text, in bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let mut parts = rest.split_whitespace();
            let n: u64 = parts.next()?.parse().ok()?;
            match parts.next() {
                Some("kB") => Some(n * 1024),
                None => Some(n),
                Some(_) => None,
            }
        })
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

/// The pool from the OS's total and available memory, narrowed to a cgroup limit
/// `(limit, free)` below it; a cgroup nearly full counts even when its limit is not below.
pub fn pool(
    kind: PoolKind,
    total: u64,
    available: u64,
    cgroup: Option<(u64, u64)>,
    process_rss: u64,
) -> Memory {
    let (mut kind, mut total, mut used) = (kind, total, total.saturating_sub(available));
    if let Some((limit, free)) = cgroup.filter(|c| c.0 > 0) {
        if limit < total {
            kind = PoolKind::Cgroup;
            total = limit;
            used = limit.saturating_sub(free);
        } else {
            used = used.max(total.saturating_sub(free));
        }
    }
    Memory {
        kind,
        total,
        used: used.max(process_rss),
        process_rss,
    }
}

/// The memory pool now, as the memory pane shows it and the loader checks it. On Linux the
/// totals come from /proc/meminfo (MemTotal/MemAvailable: on GB10 the whole unified pool);
/// elsewhere from sysinfo, which on macOS reads hw.memsize and the host_statistics64
/// counters that vm_stat prints (available = free + inactive + purgeable − compressed).
pub fn read_memory(sys: &mut System, pid: Pid, kind: PoolKind) -> Memory {
    sys.refresh_memory();
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        false,
        ProcessRefreshKind::nothing().with_memory(),
    );
    let process_rss = sys.process(pid).map_or(0, |p| p.memory());
    let (total, available) = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_meminfo(&t))
        .unwrap_or((sys.total_memory(), sys.available_memory()));
    let cgroup = sys
        .cgroup_limits()
        .map(|cg| (cg.total_memory, cg.free_memory));
    pool(kind, total, available, cgroup, process_rss)
}

/// The pool kind this build's OS implies before any GPU is seen.
pub fn os_pool_kind() -> PoolKind {
    if cfg!(target_os = "macos") {
        PoolKind::Unified
    } else {
        PoolKind::System
    }
}

/// Memory this process can still take.
pub fn available_memory() -> u64 {
    let mut sys = System::new_with_specifics(RefreshKind::nothing());
    read_memory(&mut sys, Pid::from_u32(std::process::id()), os_pool_kind()).free()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_below_the_machine_narrows_the_pool() {
        let m = pool(PoolKind::System, 100, 60, Some((50, 20)), 10);
        assert_eq!((m.kind, m.total, m.used), (PoolKind::Cgroup, 50, 30));
        let m = pool(PoolKind::Unified, 100, 60, Some((200, 5)), 10);
        assert_eq!((m.kind, m.total, m.used), (PoolKind::Unified, 100, 95));
        let m = pool(PoolKind::System, 100, 99, None, 10);
        assert_eq!(m.used, 10, "our own RSS is always counted");
    }

    #[test]
    fn meminfo_without_available_is_none() {
        assert_eq!(parse_meminfo("MemTotal: 10 kB\nMemFree: 5 kB\n"), None);
        assert_eq!(
            parse_meminfo("MemTotal:  10 kB\nMemAvailable:   4 kB\n"),
            Some((10240, 4096))
        );
    }
}
