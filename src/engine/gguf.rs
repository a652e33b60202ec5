//! Opening a GGUF file: every way a file can be bad becomes a clear error here, before any
//! weight is read, so a corrupt download never panics or half-loads.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// One file of a (possibly split) GGUF model.
struct Part {
    path: PathBuf,
    content: Content,
    file_size: u64,
    reader: BufReader<File>,
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
            .content
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
            for name in part.content.tensor_infos.keys() {
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
            file_size: parts.iter().map(|p| p.file_size).sum(),
            parts,
            index,
        })
    }

    fn metadata(&self) -> &HashMap<String, Value> {
        &self.parts[0].content.metadata
    }

    fn tensor_infos(&self) -> impl Iterator<Item = &TensorInfo> {
        self.parts
            .iter()
            .flat_map(|p| p.content.tensor_infos.values())
    }
}

impl Part {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let file_size = file.metadata()?.len();
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 4];
        if file_size < 4 || reader.read_exact(&mut magic).is_err() {
            bail!(
                "{} is not a GGUF model: the file is only {file_size} bytes",
                path.display()
            );
        }
        if &magic != b"GGUF" {
            bail!(
                "{} is not a GGUF model: it starts with {:?} instead of the magic \"GGUF\"",
                path.display(),
                String::from_utf8_lossy(&magic)
            );
        }
        reader.rewind()?;
        // candle's reader trusts what it divides by and multiplies; check those first.
        scan_header(&mut reader, file_size).map_err(|e| {
            anyhow::anyhow!(
                "{} is a corrupt or truncated GGUF file: {e}",
                path.display()
            )
        })?;
        reader.rewind()?;
        let content = Content::read(&mut reader).map_err(|e| {
            anyhow::anyhow!(
                "{} is a corrupt or truncated GGUF file (header unreadable: {e})",
                path.display()
            )
        })?;
        let part = Self {
            path: path.to_owned(),
            content,
            file_size,
            reader,
        };
        part.check_tensor_bounds()?;
        Ok(part)
    }

    /// A truncated download keeps a valid header; catch it here rather than mid-load. Sizes
    /// are computed with checked arithmetic: a corrupt shape is an error, not a wrap-around.
    fn check_tensor_bounds(&self) -> Result<()> {
        let data_start = self.content.tensor_data_offset;
        for (name, info) in &self.content.tensor_infos {
            let dims = info.shape.dims();
            let dtype = info.ggml_dtype;
            if matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) {
                bail!(
                    "{} is corrupt: tensor {name} has type {dtype:?}, which only exists as a scratch format and is never stored in a model",
                    self.path.display()
                );
            }
            let Some(bytes) = tensor_bytes_checked(info) else {
                bail!(
                    "{} is corrupt: tensor {name} has shape {dims:?}, whose size overflows",
                    self.path.display()
                );
            };
            let block = dtype.block_size();
            let row = dims.last().copied().unwrap_or(1);
            if row % block != 0 {
                bail!(
                    "{} is corrupt: tensor {name} has rows of {row} values, not a multiple of its {dtype:?} block size {block}",
                    self.path.display()
                );
            }
            let end = data_start
                .checked_add(info.offset)
                .and_then(|s| s.checked_add(bytes));
            match end {
                Some(end) if end <= self.file_size => {}
                _ => bail!(
                    "{} is truncated: tensor {name} ends at byte {} but the file has {} bytes (an interrupted download? fetch it again)",
                    self.path.display(),
                    end.map_or("beyond 2^64".to_string(), |e| e.to_string()),
                    self.file_size
                ),
            }
        }
        Ok(())
    }
}

/// Bytes of a tensor's data, None when its shape overflows.
fn tensor_bytes_checked(t: &TensorInfo) -> Option<u64> {
    let elems = t
        .shape
        .dims()
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))?;
    let dtype = t.ggml_dtype;
    (elems / dtype.block_size() as u64).checked_mul(dtype.type_size() as u64)
}

/// Bytes of a tensor's data; every tensor's size was checked when the file was opened.
fn tensor_bytes(t: &TensorInfo) -> u64 {
    tensor_bytes_checked(t).unwrap_or(u64::MAX)
}

impl Gguf {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata().get(key)
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
        let &i = self.index.get(name)?;
        Some(self.parts[i].content.tensor_infos.get(name)?.shape.dims())
    }

    /// Names of all tensors, in no particular order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        let Some(&i) = self.index.get(name) else {
            bail!(
                "{} lacks the tensor {name} its architecture needs",
                self.path.display()
            );
        };
        let part = &mut self.parts[i];
        part.content
            .tensor(&mut part.reader, name, device)
            .with_context(|| format!("reading tensor {name} from {}", part.path.display()))
    }

    /// Total parameters, counted from the tensor shapes.
    pub fn parameter_count(&self) -> u64 {
        self.tensor_infos()
            .map(|t| t.shape.dims().iter().map(|&d| d as u64).product::<u64>())
            .sum()
    }

    /// Bytes of tensor data (what the weights occupy once loaded).
    pub fn weight_bytes(&self) -> u64 {
        self.tensor_infos().map(tensor_bytes).sum()
    }

    /// The file's quantization as llama.cpp names it ("Q4_K_M", from `general.file_type`),
    /// else the type most of the weight bytes use.
    pub fn dominant_quant(&self) -> String {
        const FILE_TYPES: [(u32, &str); 17] = [
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
            (32, "BF16"),
        ];
        if let Some(ft) = self.get_u32("general.file_type") {
            if let Some((_, name)) = FILE_TYPES.iter().find(|(t, _)| *t == ft) {
                return name.to_string();
            }
        }
        let mut by_type: HashMap<String, u64> = HashMap::new();
        for t in self.tensor_infos() {
            *by_type.entry(format!("{:?}", t.ggml_dtype)).or_default() += tensor_bytes(t);
        }
        by_type
            .into_iter()
            .max_by_key(|(_, b)| *b)
            .map(|(t, _)| t.to_uppercase())
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

/// Largest `general.alignment` accepted; llama.cpp writes 32, some tools 64 or a page.
const MAX_ALIGNMENT: u64 = 1 << 20;
/// As candle's reader: deeper nesting is refused rather than recursed into.
const MAX_VALUE_DEPTH: usize = 64;

/// Walks the raw header before candle's `Content::read` sees it, checking what that reader
/// trusts: `general.alignment` (it divides by it), duplicate metadata keys and tensor names
/// (its maps keep the last silently), the dimension count and that each tensor's dimensions
/// multiply without overflow. Values are skipped, not stored, so this allocates nothing
/// that the file's own size does not bound. Hand-written because candle offers no
/// validating reader and the format is small (ggml/docs/gguf.md).
fn scan_header<R: Read + Seek>(r: &mut R, file_size: u64) -> Result<()> {
    let _magic = read_u32(r)?;
    let version = read_u32(r)?;
    if !(1..=3).contains(&version) {
        bail!("unsupported GGUF version {version} (1, 2 and 3 exist)");
    }
    let wide = version >= 2;
    let len = |r: &mut R| -> Result<u64> {
        if wide {
            read_u64(r)
        } else {
            read_u32(r).map(u64::from)
        }
    };
    let n_tensors = len(r)?;
    let n_kv = len(r)?;
    // Every entry takes at least 13 bytes: more than the file holds is a corrupt count.
    for (count, what) in [(n_tensors, "tensors"), (n_kv, "metadata entries")] {
        if count > file_size / 13 {
            bail!("the header declares {count} {what}, more than a {file_size}-byte file can hold");
        }
    }
    let mut keys = HashSet::new();
    let mut alignment = candle_core::quantized::gguf_file::DEFAULT_ALIGNMENT;
    for _ in 0..n_kv {
        let key = read_string(r, wide, file_size)?;
        let ty = read_u32(r)?;
        if key == "general.alignment" {
            let v = match ty {
                0 => u64::from(read_bytes::<1, R>(r)?[0]),
                1 => i8::from_le_bytes(read_bytes(r)?) as u64,
                2 => u64::from(u16::from_le_bytes(read_bytes(r)?)),
                3 => i16::from_le_bytes(read_bytes(r)?) as u64,
                4 => u64::from(read_u32(r)?),
                5 => i32::from_le_bytes(read_bytes(r)?) as u64,
                10 => read_u64(r)?,
                11 => i64::from_le_bytes(read_bytes(r)?) as u64,
                _ => bail!("general.alignment is not an integer (value type {ty})"),
            };
            // candle ignores 64-bit and negative values and uses 32; so must the check.
            if !matches!(ty, 10 | 11) && (ty % 2 == 0 || (v as i64) >= 0) {
                if v == 0 || !v.is_power_of_two() || v > MAX_ALIGNMENT {
                    bail!(
                        "general.alignment is {}, not a power of two up to {MAX_ALIGNMENT}",
                        v as i64
                    );
                }
                alignment = v;
            }
        } else {
            skip_value(r, ty, wide, file_size, 0)?;
        }
        if !keys.insert(key.clone()) {
            bail!("the metadata key {key} appears twice");
        }
    }
    let mut names = HashSet::new();
    for _ in 0..n_tensors {
        let name = read_string(r, wide, file_size)?;
        let n_dims = read_u32(r)?;
        if n_dims > 4 {
            bail!("tensor {name} has {n_dims} dimensions (at most 4 exist)");
        }
        let mut elems = 1u64;
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            let d = len(r)?;
            dims.push(d);
            elems = elems.saturating_mul(d);
        }
        if elems == u64::MAX || usize::try_from(elems).is_err() {
            dims.reverse();
            bail!("tensor {name} has dimensions {dims:?}, whose product overflows");
        }
        let _dtype = read_u32(r)?;
        let offset = read_u64(r)?;
        if offset % alignment != 0 {
            bail!("tensor {name} starts at offset {offset}, not a multiple of the alignment {alignment}");
        }
        if !names.insert(name.clone()) {
            bail!("the tensor {name} appears twice");
        }
    }
    Ok(())
}

fn read_bytes<const N: usize, R: Read>(r: &mut R) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)
        .context("the header ends early (truncated file?)")?;
    Ok(b)
}

fn read_u32<R: Read>(r: &mut R) -> Result<u32> {
    Ok(u32::from_le_bytes(read_bytes(r)?))
}

fn read_u64<R: Read>(r: &mut R) -> Result<u64> {
    Ok(u64::from_le_bytes(read_bytes(r)?))
}

fn remaining<R: Seek>(r: &mut R, file_size: u64) -> Result<u64> {
    Ok(file_size.saturating_sub(r.stream_position()?))
}

fn skip<R: Seek>(r: &mut R, n: u64, file_size: u64) -> Result<()> {
    if n > remaining(r, file_size)? {
        bail!("a value runs past the end of the file");
    }
    r.seek(SeekFrom::Current(n as i64))?;
    Ok(())
}

fn read_string<R: Read + Seek>(r: &mut R, wide: bool, file_size: u64) -> Result<String> {
    let n = if wide {
        read_u64(r)?
    } else {
        u64::from(read_u32(r)?)
    };
    if n > remaining(r, file_size)? {
        bail!("a string of {n} bytes runs past the end of the file");
    }
    let mut v = vec![0u8; n as usize];
    r.read_exact(&mut v)?;
    Ok(String::from_utf8_lossy(&v).into_owned())
}

fn skip_value<R: Read + Seek>(
    r: &mut R,
    ty: u32,
    wide: bool,
    file_size: u64,
    depth: usize,
) -> Result<()> {
    if depth > MAX_VALUE_DEPTH {
        bail!("metadata arrays nest deeper than {MAX_VALUE_DEPTH}");
    }
    let fixed = |ty: u32| match ty {
        0 | 1 | 7 => Some(1u64),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    };
    let str_len = |r: &mut R| -> Result<u64> {
        if wide {
            read_u64(r)
        } else {
            read_u32(r).map(u64::from)
        }
    };
    match ty {
        8 => {
            let n = str_len(r)?;
            skip(r, n, file_size)
        }
        9 => {
            let elem = read_u32(r)?;
            let n = str_len(r)?;
            if let Some(size) = fixed(elem) {
                return skip(r, n.saturating_mul(size), file_size);
            }
            if !matches!(elem, 8 | 9) {
                bail!("a metadata array has the unknown element type {elem}");
            }
            // Each string or array element takes at least 4 bytes.
            if n > remaining(r, file_size)? / 4 {
                bail!("a metadata array of {n} elements runs past the end of the file");
            }
            for _ in 0..n {
                skip_value(r, elem, wide, file_size, depth + 1)?;
            }
            Ok(())
        }
        t => match fixed(t) {
            Some(size) => skip(r, size, file_size),
            None => bail!("a metadata value has the unknown type {t}"),
        },
    }
}
