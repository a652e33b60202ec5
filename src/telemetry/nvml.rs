//! NVIDIA GPUs through NVML. `nvml-wrapper` loads libnvidia-ml at run time, so this is always
//! compiled (no CUDA toolkit or GPU needed to build) and a machine without the library says
//! "NVML not found" instead of failing. The readings go through the [`GpuQuery`] trait so the
//! logic that turns them into pane numbers is tested on recorded readings ([`RecordedGpu`]).

use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

/// Why one NVML field has no value.
#[derive(Debug, Clone, PartialEq)]
pub enum Missing {
    /// NVML answered NOT_SUPPORTED (GB10's framebuffer memory, for one).
    NotSupported,
    Error(String),
}

pub type Field<T> = Result<T, Missing>;

/// One reading of the first GPU, as NVML gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuReading {
    pub name: String,
    /// Dedicated framebuffer memory: (used, total) bytes.
    pub memory: Field<(u64, u64)>,
    /// Memory held by running compute processes, summed, in bytes (on unified-memory GPUs
    /// this is the GPU's share of the system pool).
    pub process_memory: Field<u64>,
    pub power_mw: Field<u32>,
    /// Energy since the driver loaded, in millijoules.
    pub energy_mj: Field<u64>,
    pub utilization_pct: Field<u32>,
    pub graphics_mhz: Field<u32>,
    pub memory_mhz: Field<u32>,
    pub temperature_c: Field<u32>,
}

impl GpuReading {
    /// GB10 (DGX Spark) and other coherent unified-memory parts report no framebuffer.
    pub fn is_unified(&self) -> bool {
        self.name.contains("GB10") || self.memory == Err(Missing::NotSupported)
    }
}

/// Where GPU readings come from: NVML on a real machine, recorded readings in tests.
pub trait GpuQuery: Send {
    fn read(&mut self) -> GpuReading;
}

/// NVML, loaded at run time.
pub struct NvmlGpu {
    nvml: Nvml,
}

impl NvmlGpu {
    /// Loads libnvidia-ml and checks that device 0 exists; the error is the pane's reason.
    pub fn open() -> Result<Self, String> {
        let nvml = Nvml::init().map_err(|e| match e {
            NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => {
                "NVML not found".to_string()
            }
            NvmlError::DriverNotLoaded => "NVIDIA driver not loaded".to_string(),
            e => format!("NVML: {e}"),
        })?;
        match nvml.device_count() {
            Ok(0) => return Err("NVML: no NVIDIA GPU".into()),
            Err(e) => return Err(format!("NVML: {e}")),
            Ok(_) => {}
        }
        Ok(Self { nvml })
    }
}

fn field<T>(r: Result<T, NvmlError>) -> Field<T> {
    r.map_err(|e| match e {
        NvmlError::NotSupported => Missing::NotSupported,
        e => Missing::Error(e.to_string()),
    })
}

impl GpuQuery for NvmlGpu {
    fn read(&mut self) -> GpuReading {
        let dev = match self.nvml.device_by_index(0) {
            Ok(d) => d,
            Err(e) => {
                let gone = Missing::Error(e.to_string());
                return GpuReading {
                    name: "NVIDIA GPU".into(),
                    memory: Err(gone.clone()),
                    process_memory: Err(gone.clone()),
                    power_mw: Err(gone.clone()),
                    energy_mj: Err(gone.clone()),
                    utilization_pct: Err(gone.clone()),
                    graphics_mhz: Err(gone.clone()),
                    memory_mhz: Err(gone.clone()),
                    temperature_c: Err(gone),
                };
            }
        };
        GpuReading {
            name: dev.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
            memory: field(dev.memory_info().map(|m| (m.used, m.total))),
            process_memory: field(dev.running_compute_processes().map(|ps| {
                ps.iter()
                    .map(|p| match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => b,
                        UsedGpuMemory::Unavailable => 0,
                    })
                    .sum()
            })),
            power_mw: field(dev.power_usage()),
            energy_mj: field(dev.total_energy_consumption()),
            utilization_pct: field(dev.utilization_rates().map(|u| u.gpu)),
            graphics_mhz: field(dev.clock_info(Clock::Graphics)),
            memory_mhz: field(dev.clock_info(Clock::Memory)),
            temperature_c: field(dev.temperature(TemperatureSensor::Gpu)),
        }
    }
}

/// Replays recorded readings, the last one repeating: the fake NVML for tests.
pub struct RecordedGpu {
    readings: Vec<GpuReading>,
    next: usize,
}

impl RecordedGpu {
    pub fn new(readings: Vec<GpuReading>) -> Self {
        assert!(!readings.is_empty(), "a recording needs a reading");
        Self { readings, next: 0 }
    }
}

impl GpuQuery for RecordedGpu {
    fn read(&mut self) -> GpuReading {
        let r = self.readings[self.next.min(self.readings.len() - 1)].clone();
        self.next += 1;
        r
    }
}
