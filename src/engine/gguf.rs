//! Opening a GGUF file: every way a file can be bad becomes a clear error here, before any
//! weight is read, so a corrupt download never panics or half-loads.
//!
//! The header parser is tokentop's own (ggml/docs/gguf.md; type ids and block layouts from
//! ggml/include/ggml.h and ggml/src/ggml.c's type_traits). candle's `gguf_file::Content::read`
//! refuses every tensor type candle cannot compute with (the IQ types, MXFP4, TQ…), and the
//! Rust GGUF crates we looked at (gguf-rs 0.1, gguf 0.1, and the readers inside whole
//! inference engines) either lag ggml's type list, read tensors into owned buffers instead of
//! handing out slices of a map, or do not bound what a hostile header makes them allocate.
//! The format is small; the checks below are what the hostile-file tests hold us to.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use memmap2::Mmap;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Every tensor type ggml defines (enum ggml_type), with its block geometry from ggml.c's
/// type_traits. Ids 4, 5, 31–33 and 36–38 were removed from ggml and are refused.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// (type, ggml id, values per block, bytes per block).
const TYPES: [(GgmlType, u32, usize, usize); 34] = {
    use GgmlType::*;
    [
        (F32, 0, 1, 4),
        (F16, 1, 1, 2),
        (Q4_0, 2, 32, 18),
        (Q4_1, 3, 32, 20),
        (Q5_0, 6, 32, 22),
        (Q5_1, 7, 32, 24),
        (Q8_0, 8, 32, 34),
        (Q8_1, 9, 32, 36),
        (Q2_K, 10, 256, 84),
        (Q3_K, 11, 256, 110),
        (Q4_K, 12, 256, 144),
        (Q5_K, 13, 256, 176),
        (Q6_K, 14, 256, 210),
        (Q8_K, 15, 256, 292),
        (IQ2_XXS, 16, 256, 66),
        (IQ2_XS, 17, 256, 74),
        (IQ3_XXS, 18, 256, 98),
        (IQ1_S, 19, 256, 50),
        (IQ4_NL, 20, 32, 18),
        (IQ3_S, 21, 256, 110),
        (IQ2_S, 22, 256, 82),
        (IQ4_XS, 23, 256, 136),
        (I8, 24, 1, 1),
        (I16, 25, 1, 2),
        (I32, 26, 1, 4),
        (I64, 27, 1, 8),
        (F64, 28, 1, 8),
        (IQ1_M, 29, 256, 56),
        (BF16, 30, 1, 2),
        (TQ1_0, 34, 256, 54),
        (TQ2_0, 35, 256, 66),
        (MXFP4, 39, 32, 17),
        (NVFP4, 40, 64, 36),
        (Q1_0, 41, 128, 18),
    ]
};

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }

    fn row(self) -> &'static (GgmlType, u32, usize, usize) {
        TYPES
            .iter()
            .find(|t| t.0 == self)
            .expect("every type has a row")
    }

    /// ggml's type id, as stored in a GGUF tensor info.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        self.row().2
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.row().3
    }

    /// candle's name for the type, where candle has the type.
    pub fn to_candle(self) -> Option<GgmlDType> {
        use GgmlType::*;
        Some(match self {
            F32 => GgmlDType::F32,
            F16 => GgmlDType::F16,
            BF16 => GgmlDType::BF16,
            Q4_0 => GgmlDType::Q4_0,
            Q4_1 => GgmlDType::Q4_1,
            Q5_0 => GgmlDType::Q5_0,
            Q5_1 => GgmlDType::Q5_1,
            Q8_0 => GgmlDType::Q8_0,
            Q8_1 => GgmlDType::Q8_1,
            Q2_K => GgmlDType::Q2K,
            Q3_K => GgmlDType::Q3K,
            Q4_K => GgmlDType::Q4K,
            Q5_K => GgmlDType::Q5K,
            Q6_K => GgmlDType::Q6K,
            Q8_K => GgmlDType::Q8K,
            _ => return None,
        })
    }

    /// Bytes of `elems` values, None when it overflows or is not a whole number of blocks.
    pub fn bytes_for(self, elems: u64) -> Option<u64> {
        let block = self.block_size() as u64;
        if !elems.is_multiple_of(block) {
            return None;
        }
        (elems / block).checked_mul(self.type_size() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub ty: GgmlType,
    /// Outermost dimension first (rows, then columns), the reverse of the file's order.
    pub dims: Vec<usize>,
    /// Byte offset inside its part's file (the data section's start already added).
    pub start: u64,
    /// Bytes of data.
    pub bytes: u64,
}

impl TensorInfo {
    pub fn elems(&self) -> u64 {
        self.dims.iter().map(|&d| d as u64).product()
    }
}

/// What one file's header says.
struct Header {
    metadata: HashMap<String, Value>,
    /// Metadata arrays of more than LAZY_ARRAY elements (the vocabulary, its scores, types
    /// and merges), checked at open but decoded only when asked for (see
    /// `Gguf::string_array`): as parsed values they took 8 MB beside SmolLM2's 96 MB of
    /// weights and 33 MB beside Gemma 3 270M's 247 MB, for the whole load.
    arrays: HashMap<String, LazyArray>,
    tensors: HashMap<String, TensorInfo>,
}

/// Where a large metadata array lies in its file.
#[derive(Debug, Clone, Copy)]
struct LazyArray {
    /// GGUF element type.
    elem: u32,
    n: u64,
    /// Offset of the first element.
    start: usize,
    /// Offset just past the last one.
    end: usize,
    /// GGUF v2+ lengths (else v1's u32).
    wide: bool,
}

/// Arrays longer than this are kept in the map instead of parsed at open.
const LAZY_ARRAY: u64 = 1024;

/// One file of a (possibly split) GGUF model, memory-mapped.
struct Part {
    path: PathBuf,
    map: Arc<Mmap>,
    header: Header,
}

/// A tensor's bytes inside the map, holding the map open for as long as it lives (the token
/// embedding reads its rows from the file this way instead of keeping a copy).
#[derive(Clone)]
pub struct Mapped {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl Mapped {
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

impl fmt::Debug for Mapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mapped({} bytes at {})", self.len, self.start)
    }
}

/// An open, validated GGUF model: header parsed and every tensor known to lie inside its
/// file. A split model (`name-00001-of-00003.gguf`) is opened from its first part and reads
/// the others beside it.
pub struct Gguf {
    pub path: PathBuf,
    /// Bytes of all parts together.
    pub file_size: u64,
    parts: Vec<Part>,
    /// Which part holds each tensor.
    index: HashMap<String, usize>,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let first = Part::open(path)?;
        let count = first
            .header
            .metadata
            .get("split.count")
            .and_then(value_as_u64)
            .unwrap_or(1);
        let mut parts = vec![first];
        if count > 1 {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let suffix = format!("-00001-of-{count:05}.gguf");
            let Some(stem) = name.strip_suffix(&suffix) else {
                bail!(
                    "{} is part of a {count}-part split GGUF; open its first part (…{suffix})",
                    path.display()
                );
            };
            for i in 2..=count {
                let sibling = path.with_file_name(format!("{stem}-{i:05}-of-{count:05}.gguf"));
                if !sibling.is_file() {
                    bail!(
                        "split GGUF part {} is missing (the model has {count} parts)",
                        sibling.display()
                    );
                }
                parts.push(Part::open(&sibling)?);
            }
        }
        let mut index = HashMap::new();
        for (i, part) in parts.iter().enumerate() {
            for name in part.header.tensors.keys() {
                if let Some(first) = index.insert(name.clone(), i) {
                    bail!(
                        "{} is corrupt: tensor {name} appears in both {} and {}",
                        path.display(),
                        parts[first].path.display(),
                        part.path.display()
                    );
                }
            }
        }
        Ok(Self {
            path: path.to_owned(),
            file_size: parts.iter().map(|p| p.map.len() as u64).sum(),
            parts,
            index,
        })
    }

    fn metadata(&self) -> &HashMap<String, Value> {
        &self.parts[0].header.metadata
    }

    fn tensor_infos(&self) -> impl Iterator<Item = &TensorInfo> {
        self.parts.iter().flat_map(|p| p.header.tensors.values())
    }

    fn info(&self, name: &str) -> Option<(&Part, &TensorInfo)> {
        let &i = self.index.get(name)?;
        let part = &self.parts[i];
        Some((part, part.header.tensors.get(name)?))
    }
}

/// A read fault on a file mapping makes more than its own page resident: Linux maps the
/// page-cache pages around it ("fault around", 64 KiB by default) and, on file systems
/// with large folios (ext4, xfs), the whole folio, up to 2 MiB. So reading one tensor maps
/// pieces of its neighbours, which stay resident if their own tensor was given back
/// already (measured: 12.6 MB of SmolLM2's 96 MB file in 64 KiB runs, 63 MB of a 1.5 GB
/// MoE file in runs of up to 960 KiB). Ranges given back are widened to this alignment so
/// those pages go too; a neighbour still being read simply faults its pages in again from
/// the page cache.
const FAULT_AROUND: usize = 2 << 20;

impl Part {
    /// Drops this process's pages of `len` bytes at `offset` (widened to FAULT_AROUND, within
    /// the map) with MADV_DONTNEED.
    fn give_back(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        {
            let start = offset - offset % FAULT_AROUND;
            let end = offset
                .saturating_add(len)
                .div_ceil(FAULT_AROUND)
                .saturating_mul(FAULT_AROUND)
                .min(self.map.len());
            if start >= end {
                return;
            }
            // SAFETY: the map is read-only and never written, so MADV_DONTNEED only drops
            // clean pages; any later read (another thread still packing a neighbouring
            // tensor, the embedding) sees the file's bytes again, faulted in from the page
            // cache, which is what every borrowed slice of the map expects. An error (an old
            // kernel) is harmless: the pages simply stay.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }

    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only and private to this process. If another process
        // truncates the file while it is mapped, reading the lost pages raises SIGBUS: the
        // sizes are checked against the file's length here, at open, and tokentop never
        // writes model files in place (the store downloads to a temporary name and renames).
        let map = Arc::new(
            unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot map {} into memory", path.display()))?,
        );
        if map.len() < 4 {
            bail!(
                "{} is not a GGUF model: the file is only {} bytes",
                path.display(),
                map.len()
            );
        }
        if &map[..4] != b"GGUF" {
            bail!(
                "{} is not a GGUF model: it starts with {:?} instead of the magic \"GGUF\"",
                path.display(),
                String::from_utf8_lossy(&map[..4])
            );
        }
        let header = parse_header(&map).map_err(|e| {
            anyhow::anyhow!(
                "{} is a corrupt or truncated GGUF file: {e}",
                path.display()
            )
        })?;
        let part = Self {
            path: path.to_owned(),
            map,
            header,
        };
        part.check_tensors()?;
        // The header is parsed into owned values: its pages (the vocabulary, megabytes for
        // a large one) are not read again.
        let data_start = part.header.tensors.values().map(|t| t.start).min();
        part.give_back(0, data_start.unwrap_or(part.map.len() as u64) as usize);
        Ok(part)
    }

    /// A truncated download keeps a valid header; catch it here rather than mid-load. Sizes
    /// are computed with checked arithmetic: a corrupt shape is an error, not a wrap-around.
    fn check_tensors(&self) -> Result<()> {
        let file_size = self.map.len() as u64;
        for (name, info) in &self.header.tensors {
            let (dims, ty) = (&info.dims, info.ty);
            if matches!(ty, GgmlType::Q8_1 | GgmlType::Q8_K) {
                bail!(
                    "{} is corrupt: tensor {name} has type {ty}, which only exists as a scratch format and is never stored in a model",
                    self.path.display()
                );
            }
            let block = ty.block_size();
            let row = dims.last().copied().unwrap_or(1);
            if !row.is_multiple_of(block) {
                bail!(
                    "{} is corrupt: tensor {name} has rows of {row} values, not a multiple of its {ty} block size {block}",
                    self.path.display()
                );
            }
            let end = info.start.checked_add(info.bytes);
            match end {
                Some(end) if end <= file_size => {}
                _ => bail!(
                    "{} is truncated: tensor {name} ends at byte {} but the file has {} bytes (an interrupted download? fetch it again)",
                    self.path.display(),
                    end.map_or("beyond 2^64".to_string(), |e| e.to_string()),
                    file_size
                ),
            }
        }
        Ok(())
    }

    fn data(&self, info: &TensorInfo) -> &[u8] {
        // check_tensors proved start + bytes <= the map's length.
        &self.map[info.start as usize..(info.start + info.bytes) as usize]
    }
}

impl Gguf {
    /// A metadata value; None for a large array too (read those with `string_array` and
    /// `number_array`).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata().get(key)
    }

    /// Whether the file has this metadata key (of any type, large arrays included).
    pub fn has_key(&self, key: &str) -> bool {
        self.metadata().contains_key(key) || self.parts[0].header.arrays.contains_key(key)
    }

    /// A metadata array of strings: None when the key is absent, an error when it is not
    /// an array of strings.
    pub fn string_array(&self, key: &str) -> Option<Result<Vec<String>>> {
        let part = &self.parts[0];
        if let Some(a) = part.header.arrays.get(key) {
            if a.elem != 8 {
                return Some(Err(anyhow::anyhow!("{key} holds a non-string entry")));
            }
            let mut r = Reader {
                b: &part.map[..a.end],
                pos: a.start,
                wide: a.wide,
            };
            let out = (0..a.n).map(|_| r.string()).collect();
            part.give_back(a.start, a.end - a.start);
            return Some(out);
        }
        Some(match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => bail!("{key} holds a non-string entry"),
                })
                .collect(),
            _ => Err(anyhow::anyhow!("{key} is not an array")),
        })
    }

    /// A metadata array of numbers as f64: None when the key is absent or holds anything
    /// else.
    pub fn number_array(&self, key: &str) -> Option<Vec<f64>> {
        let part = &self.parts[0];
        if let Some(a) = part.header.arrays.get(key) {
            let bytes = &part.map[a.start..a.end];
            let le = |n: usize| bytes.chunks_exact(n);
            let out: Option<Vec<f64>> = match a.elem {
                0 => Some(bytes.iter().map(|&b| b as f64).collect()),
                1 => Some(bytes.iter().map(|&b| b as i8 as f64).collect()),
                2 => Some(
                    le(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]) as f64)
                        .collect(),
                ),
                3 => Some(
                    le(2)
                        .map(|c| i16::from_le_bytes([c[0], c[1]]) as f64)
                        .collect(),
                ),
                4 => Some(
                    le(4)
                        .map(|c| u32::from_le_bytes(c.try_into().expect("4")) as f64)
                        .collect(),
                ),
                5 => Some(
                    le(4)
                        .map(|c| i32::from_le_bytes(c.try_into().expect("4")) as f64)
                        .collect(),
                ),
                6 => Some(
                    le(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("4")) as f64)
                        .collect(),
                ),
                10 => Some(
                    le(8)
                        .map(|c| u64::from_le_bytes(c.try_into().expect("8")) as f64)
                        .collect(),
                ),
                11 => Some(
                    le(8)
                        .map(|c| i64::from_le_bytes(c.try_into().expect("8")) as f64)
                        .collect(),
                ),
                12 => Some(
                    le(8)
                        .map(|c| f64::from_le_bytes(c.try_into().expect("8")))
                        .collect(),
                ),
                _ => None,
            };
            part.give_back(a.start, a.end - a.start);
            return out;
        }
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::F32(x) => Some(*x as f64),
                    Value::F64(x) => Some(*x),
                    Value::I32(x) => Some(*x as f64),
                    Value::U32(x) => Some(*x as f64),
                    Value::I8(x) => Some(*x as f64),
                    Value::U8(x) => Some(*x as f64),
                    Value::I16(x) => Some(*x as f64),
                    Value::U16(x) => Some(*x as f64),
                    Value::I64(x) => Some(*x as f64),
                    Value::U64(x) => Some(*x as f64),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key).and_then(value_as_u64).map(|v| v as u32)
    }

    pub fn get_f32(&self, key: &str) -> Option<f32> {
        match self.get(key)? {
            Value::F32(v) => Some(*v),
            Value::F64(v) => Some(*v as f32),
            other => value_as_u64(other).map(|v| v as f32),
        }
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            other => value_as_u64(other).map(|v| v != 0),
        }
    }

    pub fn require_u32(&self, key: &str) -> Result<u32> {
        self.get_u32(key).with_context(|| {
            format!(
                "{} lacks the metadata key {key} (is it a complete model file?)",
                self.path.display()
            )
        })
    }

    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture").with_context(|| {
            format!(
                "{} has no general.architecture in its metadata",
                self.path.display()
            )
        })
    }

    /// A tensor's shape, outermost dimension first (rows, then columns), without reading it.
    pub fn tensor_dims(&self, name: &str) -> Option<&[usize]> {
        self.info(name).map(|(_, t)| t.dims.as_slice())
    }

    /// A tensor's type, without reading it.
    pub fn tensor_type(&self, name: &str) -> Option<GgmlType> {
        self.info(name).map(|(_, t)| t.ty)
    }

    /// Names of all tensors, in no particular order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn lacks(&self, name: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "{} lacks the tensor {name} its architecture needs",
            self.path.display()
        )
    }

    /// A tensor's type, shape (outermost first) and bytes exactly as the file stores them,
    /// read from the map without a copy: for types candle lacks, and for kernels that repack.
    pub fn raw(&self, name: &str) -> Result<(GgmlType, &[usize], &[u8])> {
        let (part, info) = self.info(name).ok_or_else(|| self.lacks(name))?;
        Ok((info.ty, &info.dims, part.data(info)))
    }

    /// A tensor's bytes as a handle that keeps the file mapped (see [`Mapped`]).
    pub fn mapped(&self, name: &str) -> Result<(GgmlType, Vec<usize>, Mapped)> {
        let (part, info) = self.info(name).ok_or_else(|| self.lacks(name))?;
        let mapped = Mapped {
            map: part.map.clone(),
            start: info.start as usize,
            len: info.bytes as usize,
        };
        Ok((info.ty, info.dims.clone(), mapped))
    }

    /// Gives back this process's pages of a tensor that has been copied or repacked, so the
    /// file's pages and the weights built from them are not both resident (peak memory stays
    /// near the file's size). The pages stay in the page cache; a later read of the range
    /// (a neighbouring tensor sharing a page, the embedding) faults them in again from there.
    pub fn release(&self, name: &str) {
        if let Some((part, info)) = self.info(name) {
            part.give_back(info.start as usize, info.bytes as usize);
        }
    }

    /// `release` for any slice of the map (one expert's rows of a stacked tensor).
    pub fn release_bytes(&self, bytes: &[u8]) {
        for part in &self.parts {
            let base = part.map.as_ptr() as usize;
            let at = bytes.as_ptr() as usize;
            if at >= base && at + bytes.len() <= base + part.map.len() {
                part.give_back(at - base, bytes.len());
            }
        }
    }

    /// A tensor as candle's quantized tensor (its blocks copied from the map onto `device`);
    /// a type candle has no kernels for is a one-line error naming it.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let (ty, dims, data) = self.raw(name)?;
        let Some(dtype) = ty.to_candle() else {
            bail!(
                "{}: tensor {name} has type {ty}, which tokentop does not support yet (it runs F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K to Q6_K)",
                self.path.display()
            );
        };
        candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, data, dims.to_vec(), device)
            .with_context(|| format!("reading tensor {name} from {}", self.path.display()))
    }

    /// Total parameters, counted from the tensor shapes.
    pub fn parameter_count(&self) -> u64 {
        self.tensor_infos().map(TensorInfo::elems).sum()
    }

    /// Bytes of tensor data (what the weights occupy once loaded).
    pub fn weight_bytes(&self) -> u64 {
        self.tensor_infos().map(|t| t.bytes).sum()
    }

    /// The file's quantization as llama.cpp names it ("Q4_K_M", from `general.file_type`,
    /// llama.h's enum llama_ftype), else the type most of the weight bytes use.
    pub fn dominant_quant(&self) -> String {
        const FILE_TYPES: [(u32, &str); 35] = [
            (0, "F32"),
            (1, "F16"),
            (2, "Q4_0"),
            (3, "Q4_1"),
            (7, "Q8_0"),
            (8, "Q5_0"),
            (9, "Q5_1"),
            (10, "Q2_K"),
            (11, "Q3_K_S"),
            (12, "Q3_K_M"),
            (13, "Q3_K_L"),
            (14, "Q4_K_S"),
            (15, "Q4_K_M"),
            (16, "Q5_K_S"),
            (17, "Q5_K_M"),
            (18, "Q6_K"),
            (19, "IQ2_XXS"),
            (20, "IQ2_XS"),
            (21, "Q2_K_S"),
            (22, "IQ3_XS"),
            (23, "IQ3_XXS"),
            (24, "IQ1_S"),
            (25, "IQ4_NL"),
            (26, "IQ3_S"),
            (27, "IQ3_M"),
            (28, "IQ2_S"),
            (29, "IQ2_M"),
            (30, "IQ4_XS"),
            (31, "IQ1_M"),
            (32, "BF16"),
            (36, "TQ1_0"),
            (37, "TQ2_0"),
            (38, "MXFP4_MOE"),
            (39, "NVFP4"),
            (40, "Q1_0"),
        ];
        if let Some(ft) = self.get_u32("general.file_type") {
            if let Some((_, name)) = FILE_TYPES.iter().find(|(t, _)| *t == ft) {
                return name.to_string();
            }
        }
        let mut by_type: HashMap<GgmlType, u64> = HashMap::new();
        for t in self.tensor_infos() {
            *by_type.entry(t.ty).or_default() += t.bytes;
        }
        by_type
            .into_iter()
            .max_by_key(|(_, b)| *b)
            .map(|(t, _)| t.to_string())
            .unwrap_or_default()
    }
}

fn value_as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(v) => Some(*v as u64),
        Value::I8(v) => u64::try_from(*v).ok(),
        Value::U16(v) => Some(*v as u64),
        Value::I16(v) => u64::try_from(*v).ok(),
        Value::U32(v) => Some(*v as u64),
        Value::I32(v) => u64::try_from(*v).ok(),
        Value::U64(v) => Some(*v),
        Value::I64(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

/// GGUF's default alignment of tensor data.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest `general.alignment` accepted; llama.cpp writes 32, some tools 64 or a page.
const MAX_ALIGNMENT: u64 = 1 << 20;
/// Deeper nesting of metadata arrays is refused rather than recursed into.
const MAX_VALUE_DEPTH: usize = 64;
/// GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;

/// Reads little-endian fields from the header, every read bounded by the file's end.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    /// GGUF v1 stores lengths and counts as u32, later versions as u64.
    wide: bool,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!("the header ends early (truncated file?)");
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N as u64)?.try_into().expect("took N bytes"))
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn len(&mut self) -> Result<u64> {
        if self.wide {
            self.u64()
        } else {
            self.u32().map(u64::from)
        }
    }

    /// GGUF strings are not NUL-terminated, but some writers add NULs: they are dropped,
    /// and invalid UTF-8 is replaced rather than refused (as candle and llama.cpp read them).
    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        if n > self.remaining() {
            bail!("a string of {n} bytes runs past the end of the file");
        }
        let mut s = self.take(n)?;
        while let [rest @ .., 0] = s {
            s = rest;
        }
        Ok(String::from_utf8_lossy(s).into_owned())
    }

    /// A large array of strings or numbers (type 9) walked over and kept as its place in the
    /// file, every element checked as `value` would; None (nothing read) for anything else.
    fn lazy_array(&mut self, ty: u32) -> Result<Option<LazyArray>> {
        if ty != 9 {
            return Ok(None);
        }
        let at = self.pos;
        let elem = self.u32()?;
        let n = self.len()?;
        // Bytes per element; None for strings (a length, then the bytes).
        let size: Option<u64> = match elem {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            8 => None,
            _ => {
                self.pos = at;
                return Ok(None);
            }
        };
        if n <= LAZY_ARRAY {
            self.pos = at;
            return Ok(None);
        }
        let start = self.pos;
        let Some(size) = size else {
            if n > self.remaining() / 4 {
                bail!("a metadata array of {n} elements runs past the end of the file");
            }
            for _ in 0..n {
                let len = self.len()?;
                self.take(len).map_err(|_| {
                    anyhow::anyhow!("a string of {len} bytes runs past the end of the file")
                })?;
            }
            return Ok(Some(self.lazy(elem, n, start)));
        };
        if n > self.remaining() / size {
            bail!("a metadata array of {n} elements runs past the end of the file");
        }
        if elem == 7 {
            if let Some(b) = self.b[start..start + n as usize].iter().find(|&&b| b > 1) {
                bail!("a boolean metadata value is {b}, neither 0 nor 1");
            }
        }
        self.take(n * size)?;
        Ok(Some(self.lazy(elem, n, start)))
    }

    /// The array of `n` elements of type `elem` from `start` up to the current position.
    fn lazy(&self, elem: u32, n: u64, start: usize) -> LazyArray {
        LazyArray {
            elem,
            n,
            start,
            end: self.pos,
            wide: self.wide,
        }
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        if depth > MAX_VALUE_DEPTH {
            bail!("metadata arrays nest deeper than {MAX_VALUE_DEPTH}");
        }
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.u8()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("a boolean metadata value is {b}, neither 0 nor 1"),
            },
            8 => Value::String(self.string()?),
            9 => {
                let elem = self.u32()?;
                let n = self.len()?;
                // The least bytes one element takes: more elements than the rest of the file
                // holds is a corrupt count, refused before anything is allocated.
                let least = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 | 9 => 4,
                    _ => bail!("a metadata array has the unknown element type {elem}"),
                };
                if n > self.remaining() / least {
                    bail!("a metadata array of {n} elements runs past the end of the file");
                }
                let mut vs = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    vs.push(self.value(elem, depth + 1)?);
                }
                Value::Array(vs)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            t => bail!("a metadata value has the unknown type {t}"),
        })
    }
}

/// Parses one file's header: metadata of every GGUF value type, tensor infos, alignment and
/// where the data starts. Checks what later code trusts: the alignment (a power of two),
/// duplicate keys and tensor names, the dimension count, dimensions whose product overflows,
/// known type ids, whole blocks, and offsets on the alignment. Counts are bounded by the
/// file's size before anything is allocated.
fn parse_header(b: &[u8]) -> Result<Header> {
    let mut r = Reader {
        b,
        pos: 4,
        wide: true,
    };
    let version = r.u32()?;
    if !(1..=3).contains(&version) {
        bail!("unsupported GGUF version {version} (1, 2 and 3 exist)");
    }
    r.wide = version >= 2;
    let n_tensors = r.len()?;
    let n_kv = r.len()?;
    let file_size = b.len() as u64;
    // Every entry takes at least 13 bytes: more than the file holds is a corrupt count.
    for (count, what) in [(n_tensors, "tensors"), (n_kv, "metadata entries")] {
        if count > file_size / 13 {
            bail!("the header declares {count} {what}, more than a {file_size}-byte file can hold");
        }
    }
    let mut metadata = HashMap::with_capacity(n_kv as usize);
    let mut arrays = HashMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        let dup = if let Some(lazy) = r.lazy_array(ty)? {
            metadata.contains_key(&key) || arrays.insert(key.clone(), lazy).is_some()
        } else {
            let value = r.value(ty, 0)?;
            arrays.contains_key(&key) || metadata.insert(key.clone(), value).is_some()
        };
        if dup {
            bail!("the metadata key {key} appears twice");
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let n: i128 = match v {
                Value::I8(x) => (*x).into(),
                Value::I16(x) => (*x).into(),
                Value::I32(x) => (*x).into(),
                Value::I64(x) => (*x).into(),
                other => match value_as_u64(other) {
                    Some(x) => x.into(),
                    None => bail!(
                        "general.alignment is not an integer (value type {:?})",
                        other.value_type()
                    ),
                },
            };
            if n <= 0 || n > MAX_ALIGNMENT as i128 || !(n as u64).is_power_of_two() {
                bail!("general.alignment is {n}, not a power of two up to {MAX_ALIGNMENT}");
            }
            n as u64
        }
    };
    let mut infos: Vec<(String, GgmlType, Vec<usize>, u64)> =
        Vec::with_capacity(n_tensors as usize);
    let mut names = HashMap::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims > MAX_DIMS {
            bail!("tensor {name} has {n_dims} dimensions (at most {MAX_DIMS} exist)");
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.len()?);
        }
        dims.reverse();
        let elems = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let checked: Option<Vec<usize>> = match elems {
            Some(e) if usize::try_from(e).is_ok() && e < i64::MAX as u64 => {
                dims.iter().map(|&d| usize::try_from(d).ok()).collect()
            }
            _ => None,
        };
        let Some(dims) = checked else {
            bail!("tensor {name} has dimensions {dims:?}, whose product overflows");
        };
        let id = r.u32()?;
        let Some(ty) = GgmlType::from_id(id) else {
            bail!("tensor {name} has the unknown type id {id} (ggml defines 0 to 41)");
        };
        let offset = r.u64()?;
        if offset % alignment != 0 {
            bail!("tensor {name} starts at offset {offset}, not a multiple of the alignment {alignment}");
        }
        if names.insert(name.clone(), ()).is_some() {
            bail!("the tensor {name} appears twice");
        }
        infos.push((name, ty, dims, offset));
    }
    let data_start = (r.pos as u64).next_multiple_of(alignment);
    let mut tensors = HashMap::with_capacity(infos.len());
    for (name, ty, dims, offset) in infos {
        let elems: u64 = dims.iter().map(|&d| d as u64).product();
        let row = dims.last().copied().unwrap_or(1) as u64;
        // Rows that are not whole blocks are named by Part::check_tensors; their byte count
        // here is only an upper bound that keeps the size check meaningful.
        let bytes = ty
            .bytes_for(elems)
            .or_else(|| (!row.is_multiple_of(ty.block_size() as u64)).then_some(0));
        let (Some(bytes), Some(start)) = (bytes, data_start.checked_add(offset)) else {
            bail!("tensor {name} has shape {dims:?}, whose size overflows");
        };
        tensors.insert(
            name,
            TensorInfo {
                ty,
                dims,
                start,
                bytes,
            },
        );
    }
    Ok(Header {
        arrays,
        metadata,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};

    /// A GGUF with a vocabulary-sized string array, number arrays of three types and a
    /// short array, as candle writes them.
    fn file_with_arrays(dir: &Path) -> (PathBuf, Vec<String>) {
        let words: Vec<String> = (0..3000).map(|i| format!("piece{i}\u{2581}")).collect();
        let md: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(words.iter().map(|w| Value::String(w.clone())).collect()),
            ),
            (
                "tokenizer.ggml.scores",
                Value::Array((0..3000).map(|i| Value::F32(-(i as f32) / 4.0)).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array((0..3000).map(|i| Value::I32(i % 6)).collect()),
            ),
            (
                "big.u8",
                Value::Array((0..3000).map(|i| Value::U8((i % 251) as u8)).collect()),
            ),
            ("small", Value::Array((0..4).map(Value::U32).collect())),
        ];
        let w = QTensor::quantize(
            &candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let path = dir.join("arrays.gguf");
        let mut f = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut f, &md_refs, &[("w", &w)]).unwrap();
        (path, words)
    }

    /// Large arrays are kept in the map at open and read back from it exactly; short ones
    /// stay parsed values.
    #[test]
    fn large_metadata_arrays_are_read_from_the_map() {
        let dir = tempfile::tempdir().unwrap();
        let (path, words) = file_with_arrays(dir.path());
        let g = Gguf::open(&path).unwrap();
        assert!(g.get("tokenizer.ggml.tokens").is_none(), "kept lazily");
        assert!(g.has_key("tokenizer.ggml.tokens"));
        assert_eq!(
            g.string_array("tokenizer.ggml.tokens").unwrap().unwrap(),
            words
        );
        let scores = g.number_array("tokenizer.ggml.scores").unwrap();
        assert_eq!(scores.len(), 3000);
        assert!((0..3000).all(|i| scores[i] == -(i as f64) / 4.0));
        let types = g.number_array("tokenizer.ggml.token_type").unwrap();
        assert!((0..3000).all(|i| types[i] == (i % 6) as f64));
        let bytes = g.number_array("big.u8").unwrap();
        assert!((0..3000).all(|i| bytes[i] == (i % 251) as f64));
        assert!(g.string_array("tokenizer.ggml.scores").unwrap().is_err());
        assert!(g.get("small").is_some());
        assert_eq!(g.number_array("small").unwrap(), vec![0.0, 1.0, 2.0, 3.0]);
        assert!(g.string_array("small").unwrap().is_err());
        assert!(g.string_array("absent").is_none() && g.number_array("absent").is_none());
        // Read twice (the pages were given back after the first read): the same.
        assert_eq!(
            g.string_array("tokenizer.ggml.tokens").unwrap().unwrap(),
            words
        );
    }

    /// A string inside a lazy array whose length runs past the end is refused at open.
    #[test]
    fn a_corrupt_string_in_a_large_array_fails_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = file_with_arrays(dir.path());
        let mut b = std::fs::read(&path).unwrap();
        // The length of piece2000 (8-byte length, then its bytes).
        let at = b
            .windows(9)
            .position(|w| w == "piece2000".as_bytes())
            .unwrap()
            - 8;
        b[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        let e = Gguf::open(&path).err().expect("refused").to_string();
        assert!(e.contains("corrupt or truncated"), "{e}");
    }
}
