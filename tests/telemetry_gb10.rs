//! NVIDIA telemetry through the NVML trait with recorded readings, and the DGX Spark's
//! unified pool from a recorded GB10 /proc/meminfo.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};
use tokentop::telemetry::gb10::{self, GpuPower};
use tokentop::telemetry::memory::parse_meminfo;
use tokentop::telemetry::nvml::{Missing, RecordedGpu};
use tokentop::telemetry::{
    assemble, Battery, GpuMemory, GpuQuery, GpuReading, PoolKind, Power, Readings,
};

const MIB: u64 = 1 << 20;

use common::recorded_gb10 as gb10;

fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/telemetry/gb10/meminfo"),
    )
    .unwrap();
    parse_meminfo(&text).unwrap()
}

fn readings(at: Instant, gpu: GpuReading) -> Readings {
    Readings {
        at,
        os_memory: meminfo(),
        cgroup: None,
        process_rss: 2_000_000_000,
        os_kind: PoolKind::System,
        gpu: Ok(gpu),
        macmon: Err("macmon is for macOS".into()),
        sysctl: None,
        system_power: Power::Unavailable("no powercap (RAPL) interface".into()),
        battery: Battery::Unavailable("no battery".into()),
        cpu_model: None,
    }
}

#[test]
fn gb10_meminfo_is_the_unified_pool() {
    let (total, available) = meminfo();
    assert_eq!(total, 127_600_748 * 1024);
    assert_eq!(available, 118_566_368 * 1024);
    let snap = assemble(readings(Instant::now(), gb10()), &mut GpuPower::default());
    assert_eq!(snap.memory.kind, PoolKind::Unified);
    assert_eq!(snap.memory.total, 127_600_748 * 1024);
    assert_eq!(snap.memory.used, (127_600_748 - 118_566_368) * 1024);
    // NVML's memory info is NOT_SUPPORTED there: the GPU's share is its processes' memory.
    assert_eq!(
        snap.details.gpu_memory,
        GpuMemory::Share { used: 19135 * MIB }
    );
    assert_eq!(snap.details.machine.as_deref(), Some("NVIDIA GB10"));
    assert_eq!(
        snap.power,
        Power::Watts {
            watts: 11.17,
            source: "GPU (NVML)".into()
        }
    );
    let gpu = snap.details.gpu.unwrap();
    assert_eq!(
        (gpu.utilization_pct, gpu.temperature_c, gpu.graphics_mhz),
        (Some(0), Some(35), None)
    );
}

#[test]
fn discrete_gpu_shows_its_own_memory() {
    // An RTX 5090 answers memory info: 32607 MiB total (nvidia-smi's figure for the card).
    let mut r = gb10();
    r.name = "NVIDIA GeForce RTX 5090".into();
    r.memory = Ok((2_000 * MIB, 32_607 * MIB));
    assert_eq!(
        gb10::gpu_memory(&r),
        GpuMemory::Dedicated {
            used: 2_000 * MIB,
            total: 32_607 * MIB
        }
    );
    assert_eq!(gb10::pool_kind(&r, PoolKind::System), PoolKind::System);
    // Neither framebuffer nor process memory: said so, not 0.
    let mut r = gb10();
    r.process_memory = Err(Missing::NotSupported);
    assert!(matches!(gb10::gpu_memory(&r), GpuMemory::Unavailable(_)));
}

#[test]
fn energy_counter_gives_the_rate_between_readings() {
    // Three readings through the fake, 250 ms apart; the counter advances 2.8 J and then
    // 12.5 J (11.2 W, then 50 W while generating). The first reading uses the instant power.
    let t0 = Instant::now();
    let mut fake = RecordedGpu::new(
        [
            (11_170, 1_000_000),
            (11_200, 1_002_800),
            (50_000, 1_015_300),
        ]
        .into_iter()
        .map(|(mw, mj)| GpuReading {
            power_mw: Ok(mw),
            energy_mj: Ok(mj),
            ..gb10()
        })
        .collect(),
    );
    let mut power = GpuPower::default();
    let watts: Vec<f64> = (0..3)
        .map(|i| {
            let r = fake.read();
            power
                .read(&r, t0 + Duration::from_millis(250 * i))
                .watts()
                .unwrap()
        })
        .collect();
    assert!((watts[0] - 11.17).abs() < 1e-9, "{watts:?}");
    assert!((watts[1] - 11.2).abs() < 1e-9, "{watts:?}");
    assert!((watts[2] - 50.0).abs() < 1e-9, "{watts:?}");
    // The fake repeats its last reading once the recording runs out.
    assert_eq!(fake.read().energy_mj, Ok(1_015_300));
}

#[test]
fn no_nvml_is_an_honest_reason() {
    let mut r = readings(Instant::now(), gb10());
    r.gpu = Err("NVML not found".into());
    let snap = assemble(r, &mut GpuPower::default());
    assert_eq!(snap.details.gpu, Err("NVML not found".into()));
    assert_eq!(
        snap.details.gpu_memory,
        GpuMemory::Unavailable("NVML not found".into())
    );
    assert_eq!(snap.memory.kind, PoolKind::System);
    assert_eq!(
        snap.power,
        Power::Unavailable("no powercap (RAPL) interface".into())
    );
    // Power NOT_SUPPORTED on the GPU falls back to the system probe.
    let mut g = gb10();
    g.power_mw = Err(Missing::NotSupported);
    let snap = assemble(readings(Instant::now(), g), &mut GpuPower::default());
    assert!(snap.power.watts().is_none());
}

#[test]
fn this_machine_without_nvidia_says_nvml_not_found() {
    // This test machine has no NVIDIA driver: opening NVML must fail with the pane's reason
    // rather than panic. (On a machine with a GPU it opens; both are fine.)
    match tokentop::telemetry::nvml::NvmlGpu::open() {
        Ok(mut g) => assert!(!g.read().name.is_empty()),
        Err(reason) => assert!(
            reason.starts_with("NVML") || reason.contains("NVIDIA"),
            "{reason}"
        ),
    }
}
