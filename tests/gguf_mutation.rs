//! Issue 8: 10,000+ mutations of valid tiny GGUFs (bit flips, truncations, overwritten
//! counts, types, dims and offsets, random metadata values), each loaded and, when it loads,
//! asked for two tokens. Mutations run in child processes under an address-space limit
//! (gguf_tools::CHILD_MEMORY_MB): every one must end in an error or an answer; a panic, an
//! abort or running out of memory kills the child and fails the test, naming the mutation.
//! Deterministic: mutation i is derived from SEED and i alone.
mod common;
mod gguf_tools;

use gguf_tools::{fields, Field};
use std::path::{Path, PathBuf};
use tokentop::engine::synth::{SynthExperts, SynthSpec};

const SEED: u64 = 0x6767_7566_5f6d_7574;
const MUTATIONS: usize = 10_000;
/// Children run two at a time (the CI machine has 2 cores), this many mutations each.
const PER_CHILD: usize = 1_250;

/// The child process's entry point (see gguf_tools::run_child); does nothing in a normal run.
#[test]
fn child_entry() {
    let Some(range) = std::env::var_os("TT_MUTATE") else {
        return;
    };
    let range = range.into_string().unwrap();
    let (dir, range) = range.split_once('|').unwrap();
    let (from, to) = range.split_once("..").unwrap();
    let (from, to): (usize, usize) = (from.parse().unwrap(), to.parse().unwrap());
    let bases = bases_in(Path::new(dir));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    for i in from..to {
        gguf_tools::announce(i - from);
        let (bytes, what) = mutate(&bases, i);
        eprintln!("mutation {i}: {what}");
        std::fs::write(&path, &bytes).unwrap();
        gguf_tools::report(i - from, &gguf_tools::load_and_answer(&path));
    }
}

/// The valid models mutated: dense with packed block weights, stacked-expert MoE, Gemma
/// (SentencePiece, tied embedding, sliding window) and Phi-3 (fused QKV and gate-up).
fn specs() -> Vec<SynthSpec> {
    let mut llama = SynthSpec::new("llama");
    llama.n_layer = 1;
    llama.dtype = candle_core::quantized::GgmlDType::Q4_0;
    let mut moe = SynthSpec::new("qwen3moe");
    moe.n_layer = 1;
    moe.experts = Some(SynthExperts {
        count: 3,
        used: 2,
        stacked: true,
    });
    let mut gemma = SynthSpec::new("gemma3");
    gemma.n_layer = 1;
    let mut phi = SynthSpec::new("phi3");
    phi.n_layer = 1;
    vec![llama, moe, gemma, phi]
}

/// A base file's bytes and where its header fields lie.
type Base = (Vec<u8>, Vec<(usize, Field)>);

fn bases_in(dir: &Path) -> Vec<Base> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|p| {
            let b = std::fs::read(p).unwrap();
            let f = fields(&b);
            (b, f)
        })
        .collect()
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Values that break things: zero, one, powers of two and their neighbours, maxima.
fn interesting(r: &mut Rng) -> u64 {
    const V: [u64; 22] = [
        0,
        1,
        2,
        3,
        7,
        16,
        31,
        32,
        33,
        64,
        255,
        256,
        4096,
        65_535,
        65_536,
        1 << 31,
        u32::MAX as u64 - 1,
        u32::MAX as u64,
        1 << 32,
        1 << 40,
        i64::MAX as u64,
        u64::MAX,
    ];
    if r.below(4) == 0 {
        r.next() >> r.below(64)
    } else {
        V[r.below(V.len())]
    }
}

fn put(b: &mut [u8], at: usize, size: usize, v: u64) {
    let bytes = v.to_le_bytes();
    b[at..at + size].copy_from_slice(&bytes[..size]);
}

/// Mutation `i`: the bytes and a description of what changed.
fn mutate(bases: &[Base], i: usize) -> (Vec<u8>, String) {
    let mut r = Rng(SEED ^ (i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let (base, fields) = &bases[i % bases.len()];
    let mut b = base.clone();
    let header_end = fields.last().map_or(64, |(at, _)| at + 12);
    let pick = |r: &mut Rng, want: &dyn Fn(&Field) -> bool| -> Option<(usize, Field)> {
        let of: Vec<&(usize, Field)> = fields.iter().filter(|(_, f)| want(f)).collect();
        (!of.is_empty()).then(|| *of[r.below(of.len())])
    };
    let kind = r.below(10);
    let what = match kind {
        0 => {
            let n = 1 + r.below(4);
            for _ in 0..n {
                let at = if r.below(4) == 0 {
                    r.below(b.len())
                } else {
                    r.below(header_end)
                };
                b[at] ^= 1 << r.below(8);
            }
            format!("{n} bit flips")
        }
        1 => {
            let len = if r.below(2) == 0 {
                r.below(header_end)
            } else {
                r.below(b.len())
            };
            b.truncate(len);
            format!("truncated to {len} bytes")
        }
        2 => {
            let (at, _) = pick(&mut r, &|f| matches!(f, Field::Count | Field::Length)).unwrap();
            let v = interesting(&mut r);
            put(&mut b, at, 8, v);
            format!("count/length at {at} = {v}")
        }
        3 => {
            let (at, _) = pick(&mut r, &|f| matches!(f, Field::Dim)).unwrap();
            let v = interesting(&mut r);
            put(&mut b, at, 8, v);
            format!("tensor dim at {at} = {v}")
        }
        4 => {
            let (at, _) = pick(&mut r, &|f| matches!(f, Field::DType)).unwrap();
            let v = r.below(40) as u64;
            put(&mut b, at, 4, v);
            format!("tensor type at {at} = {v}")
        }
        5 => {
            let (at, _) = pick(&mut r, &|f| matches!(f, Field::Offset)).unwrap();
            let v = if r.below(2) == 0 {
                interesting(&mut r)
            } else {
                32 * r.below(b.len() / 32) as u64
            };
            put(&mut b, at, 8, v);
            format!("tensor offset at {at} = {v}")
        }
        6 => {
            let (at, _) = pick(&mut r, &|f| matches!(f, Field::ValueType | Field::NDims)).unwrap();
            let v = r.below(16) as u64;
            put(&mut b, at, 4, v);
            format!("value type / dim count at {at} = {v}")
        }
        7 | 8 => {
            // A random metadata value (block_count, head counts, lengths, rope base, eps…).
            let (at, f) = pick(
                &mut r,
                &|f| matches!(f, Field::Scalar { size, .. } if *size >= 4),
            )
            .unwrap();
            let Field::Scalar { size, float } = f else {
                unreachable!()
            };
            let v = if float && r.below(2) == 0 {
                let x = [f32::NAN, f32::INFINITY, -1.0, 0.0, 1e30, 1e-30][r.below(6)];
                if size == 4 {
                    x.to_bits() as u64
                } else {
                    (x as f64).to_bits()
                }
            } else {
                interesting(&mut r)
            };
            put(&mut b, at, size, v);
            format!("metadata value at {at} ({size} bytes) = {v:#x}")
        }
        _ => {
            let at = r.below(header_end);
            let n = 1 + r.below(16);
            for k in at..(at + n).min(b.len()) {
                b[k] = r.next() as u8;
            }
            format!("{n} random bytes at {at}")
        }
    };
    (b, format!("base {} {what}", i % bases.len()))
}

#[test]
fn ten_thousand_mutated_ggufs_never_panic_abort_or_explode() {
    let dir = tempfile::tempdir().unwrap();
    for (i, spec) in specs().iter().enumerate() {
        spec.write(&dir.path().join(format!("base{i}.gguf")))
            .unwrap();
    }
    // Each base loads and answers unmutated: the mutations start from working files.
    for (b, _) in bases_in(dir.path()) {
        let p = dir.path().join("check.bin");
        std::fs::write(&p, b).unwrap();
        assert_eq!(
            gguf_tools::load_and_answer(&p),
            gguf_tools::Outcome::Answered
        );
    }
    let start = std::time::Instant::now();
    let dir_s = dir.path().to_str().unwrap().to_string();
    let chunks: Vec<(usize, usize)> = (0..MUTATIONS)
        .step_by(PER_CHILD)
        .map(|s| (s, (s + PER_CHILD).min(MUTATIONS)))
        .collect();
    let (mut answered, mut errors) = (0, 0);
    for pair in chunks.chunks(2) {
        let outs: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = pair
                .iter()
                .map(|&(a, z)| {
                    let env = format!("{dir_s}|{a}..{z}");
                    s.spawn(move || gguf_tools::run_child("child_entry", &[("TT_MUTATE", &env)]))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (out, &(a, z)) in outs.iter().zip(pair) {
            for o in gguf_tools::parse_outcomes(out, z - a) {
                match o {
                    gguf_tools::Outcome::Answered => answered += 1,
                    gguf_tools::Outcome::Error(_) => errors += 1,
                }
            }
        }
    }
    println!(
        "{} mutations: {answered} loaded and answered, {errors} errors, no panic, abort or memory explosion, in {:.1?}",
        answered + errors,
        start.elapsed()
    );
    assert_eq!(answered + errors, MUTATIONS);
}
