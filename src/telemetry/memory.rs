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

/// A cgroup's memory: its limit, what it has charged, and how much of that is page cache
/// the kernel gives back under pressure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupMemory {
    pub limit: u64,
    pub current: u64,
    pub reclaimable: u64,
}

impl CgroupMemory {
    /// `(limit, available)`: the limit minus what the cgroup cannot give back. Page cache
    /// (inactive_file) is charged to the cgroup but reclaimed before anything is killed, so
    /// counting it as used made "free" drop by every gigabyte of files read.
    pub fn limit_and_available(&self) -> (u64, u64) {
        let held = self.current.saturating_sub(self.reclaimable);
        (self.limit, self.limit.saturating_sub(held))
    }
}

/// One `key value` field of a cgroup `memory.stat` file.
pub fn parse_memory_stat(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        (parts.next()? == key).then_some(())?;
        parts.next()?.parse().ok()
    })
}

/// A cgroup from its files' text: v2 (`memory.max`, `memory.current`, `memory.stat` with
/// `inactive_file`) or v1 (`memory.limit_in_bytes`, `memory.usage_in_bytes`, `memory.stat`
/// with `total_inactive_file`). `None` without a limit ("max", or v1's huge sentinel).
pub fn parse_cgroup(limit: &str, current: &str, stat: &str) -> Option<CgroupMemory> {
    let limit: u64 = limit.trim().parse().ok()?;
    // cgroup v1 writes "no limit" as a page-rounded i64::MAX.
    if limit >= 1 << 60 {
        return None;
    }
    let current: u64 = current.trim().parse().ok()?;
    let reclaimable = parse_memory_stat(stat, "inactive_file")
        .or_else(|| parse_memory_stat(stat, "total_inactive_file"))
        .unwrap_or(0)
        .min(current);
    Some(CgroupMemory {
        limit,
        current,
        reclaimable,
    })
}

/// This process's cgroup memory under `root` (normally /sys/fs/cgroup, which a container
/// sees as its own cgroup): v2 first, then v1's memory controller.
pub fn read_cgroup(root: &std::path::Path) -> Option<CgroupMemory> {
    let read = |dir: &std::path::Path, name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let v1 = root.join("memory");
    let found = [
        (root, "memory.max", "memory.current"),
        (
            v1.as_path(),
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
        ),
    ]
    .into_iter()
    .find_map(|(dir, limit, current)| {
        parse_cgroup(
            &read(dir, limit)?,
            &read(dir, current)?,
            &read(dir, "memory.stat").unwrap_or_default(),
        )
    });
    found
}

/// This process's cgroup as `(limit, available)`, as [`pool`] takes it.
pub fn cgroup_now() -> Option<(u64, u64)> {
    read_cgroup(std::path::Path::new("/sys/fs/cgroup")).map(|c| c.limit_and_available())
}

/// The pool from the OS's total and available memory, narrowed to a cgroup limit
/// `(limit, available)` below it; a cgroup nearly full counts even when its limit is not below.
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
    pool(kind, total, available, cgroup_now(), process_rss)
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

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/telemetry/memory");

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap()
    }

    #[test]
    fn free_is_memavailable_not_total_minus_used_pages() {
        // Recorded on a 24 GiB machine with 3.7 GiB of inactive page cache: MemFree is 17.7 GiB,
        // MemAvailable 22.1 GiB. "free" must be the latter (the cache is given back).
        let (total, available) = parse_meminfo(&fixture("meminfo-x86-24g.txt")).unwrap();
        assert_eq!(total, 24683656 * 1024);
        assert_eq!(available, 23203564 * 1024);
        let m = pool(PoolKind::System, total, available, None, 1 << 30);
        assert_eq!(m.free(), available);
    }

    #[test]
    fn a_cgroup_counts_its_inactive_page_cache_as_available() {
        let stat = fixture("memory.stat-v2.txt");
        assert_eq!(parse_memory_stat(&stat, "inactive_file"), Some(1370939392));
        assert_eq!(parse_memory_stat(&stat, "inactive_fil"), None);
        let gib = 1u64 << 30;
        // 20 GiB limit, 6 GiB charged of which 1.28 GiB inactive page cache.
        let cg = parse_cgroup("21474836480\n", &format!("{}\n", 6 * gib), &stat).unwrap();
        assert_eq!(cg.reclaimable, 1370939392);
        let (limit, avail) = cg.limit_and_available();
        assert_eq!(avail, 20 * gib - (6 * gib - 1370939392));
        let m = pool(
            PoolKind::System,
            24 * gib,
            22 * gib,
            Some((limit, avail)),
            gib,
        );
        assert_eq!((m.kind, m.total), (PoolKind::Cgroup, 20 * gib));
        assert_eq!(
            m.free(),
            avail,
            "the pane's free and the switcher's verdict"
        );
        // Reading 5 GiB of files charges them to the cgroup as inactive page cache: the
        // old total-minus-usage lost 5 GiB of "free"; available stays put.
        let read = stat.replace(
            "inactive_file 1370939392",
            &format!("inactive_file {}", 1370939392 + 5 * gib),
        );
        let after = parse_cgroup("21474836480", &(11 * gib).to_string(), &read).unwrap();
        assert_eq!(after.limit_and_available().1, avail);
    }

    #[test]
    fn cgroup_files_without_a_limit_or_in_v1_form() {
        assert_eq!(parse_cgroup("max\n", "100\n", ""), None);
        // v1 writes "no limit" as a page-rounded i64::MAX.
        assert_eq!(parse_cgroup("9223372036854771712\n", "100", ""), None);
        assert_eq!(parse_cgroup("100", "lots", ""), None);
        let v1 = parse_cgroup(
            "2147483648",
            "1500000000",
            "cache 900\ntotal_inactive_file 700000000\n",
        );
        assert_eq!(
            v1.unwrap().limit_and_available(),
            (2147483648, 2147483648 - 800000000)
        );
        // Reclaimable is never more than what is charged.
        let odd = parse_cgroup("1000", "10", "inactive_file 50").unwrap();
        assert_eq!(odd.limit_and_available(), (1000, 1000));
    }

    #[test]
    fn a_cgroup_tree_is_read_from_its_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_cgroup(dir.path()), None);
        std::fs::write(dir.path().join("memory.max"), "1000\n").unwrap();
        std::fs::write(dir.path().join("memory.current"), "600\n").unwrap();
        std::fs::write(
            dir.path().join("memory.stat"),
            "anon 300\ninactive_file 250\n",
        )
        .unwrap();
        assert_eq!(
            read_cgroup(dir.path()).unwrap().limit_and_available(),
            (1000, 650)
        );
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
