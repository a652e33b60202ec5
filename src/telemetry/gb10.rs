//! NVIDIA GPUs in the panes: GB10 (DGX Spark) has no framebuffer of its own — NVML answers
//! NOT_SUPPORTED for memory info — so its pool is the OS's (MemTotal/MemAvailable) and the
//! GPU's share is what its compute processes hold; a discrete GPU shows its own memory.
//! Power comes from the GPU's total-energy counter, so J/token integrates exactly.

use super::memory::{GpuMemory, PoolKind};
use super::nvml::{GpuReading, Missing};
use super::Power;
use std::time::Instant;

/// The GPU's memory as the memory pane shows it.
pub fn gpu_memory(r: &GpuReading) -> GpuMemory {
    match (&r.memory, &r.process_memory) {
        (Ok((used, total)), _) if !r.is_unified() => GpuMemory::Dedicated {
            used: *used,
            total: *total,
        },
        (_, Ok(used)) => GpuMemory::Share { used: *used },
        (_, Err(Missing::NotSupported)) => {
            GpuMemory::Unavailable("NVML reports no per-process GPU memory".into())
        }
        (_, Err(Missing::Error(e))) => GpuMemory::Unavailable(format!("NVML: {e}")),
    }
}

/// The pool kind with this GPU present: unified on GB10.
pub fn pool_kind(r: &GpuReading, os: PoolKind) -> PoolKind {
    if r.is_unified() {
        PoolKind::Unified
    } else {
        os
    }
}

/// GPU power from NVML: the total-energy counter's rate between two readings, the
/// instantaneous power on the first one (or where the counter is not supported).
#[derive(Debug, Default)]
pub struct GpuPower {
    last: Option<(Instant, u64)>,
}

impl GpuPower {
    pub fn read(&mut self, r: &GpuReading, now: Instant) -> Power {
        let source = "GPU (NVML)".to_string();
        let from_counter = match (&r.energy_mj, self.last) {
            (Ok(mj), Some((t0, before))) if *mj >= before && now > t0 => {
                Some((*mj - before) as f64 / 1e3 / now.duration_since(t0).as_secs_f64())
            }
            _ => None,
        };
        self.last = r.energy_mj.as_ref().ok().map(|mj| (now, *mj));
        match (from_counter, &r.power_mw) {
            (Some(watts), _) => Power::Watts { watts, source },
            (None, Ok(mw)) => Power::Watts {
                watts: *mw as f64 / 1e3,
                source,
            },
            (None, Err(Missing::NotSupported)) => {
                Power::Unavailable("NVML: power not supported on this GPU".into())
            }
            (None, Err(Missing::Error(e))) => Power::Unavailable(format!("NVML: {e}")),
        }
    }
}
