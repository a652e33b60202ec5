//! Opening a GGUF file: every way a file can be bad becomes a clear error here, before any
//! weight is read, so a corrupt download never panics or half-loads.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
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
                index.insert(name.clone(), i);
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

    /// A truncated download keeps a valid header; catch it here rather than mid-load.
    fn check_tensor_bounds(&self) -> Result<()> {
        let data_start = self.content.tensor_data_offset;
        for (name, info) in &self.content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                bail!(
                    "{} is corrupt: tensor {name} has {elems} elements, not a multiple of its block size {block}",
                    self.path.display()
                );
            }
            let end = data_start
                .saturating_add(info.offset)
                .saturating_add(tensor_bytes(info));
            if end > self.file_size {
                bail!(
                    "{} is truncated: tensor {name} ends at byte {end} but the file has {} bytes (an interrupted download? fetch it again)",
                    self.path.display(),
                    self.file_size
                );
            }
        }
        Ok(())
    }
}

fn tensor_bytes(t: &TensorInfo) -> u64 {
    (t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()) as u64
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
            .map(|t| t.shape.elem_count() as u64)
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
