//! Opening a GGUF file: every way a file can be bad becomes a clear error here, before any
//! weight is read, so a corrupt download never panics or half-loads.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// An open, validated GGUF file: header parsed and every tensor known to lie inside the file.
pub struct Gguf {
    pub path: PathBuf,
    pub content: Content,
    pub file_size: u64,
    reader: BufReader<File>,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
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
        let content = {
            use std::io::Seek;
            reader.rewind()?;
            Content::read(&mut reader).map_err(|e| {
                anyhow::anyhow!(
                    "{} is a corrupt or truncated GGUF file (header unreadable: {e})",
                    path.display()
                )
            })?
        };
        let gguf = Self {
            path: path.to_owned(),
            content,
            file_size,
            reader,
        };
        gguf.check_tensor_bounds()?;
        Ok(gguf)
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
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            let end = data_start.saturating_add(info.offset).saturating_add(bytes);
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

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
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
        self.content.tensor_infos.contains_key(name)
    }

    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.has_tensor(name) {
            bail!(
                "{} lacks the tensor {name} its architecture needs",
                self.path.display()
            );
        }
        self.content
            .tensor(&mut self.reader, name, device)
            .with_context(|| format!("reading tensor {name} from {}", self.path.display()))
    }

    /// Total parameters, counted from the tensor shapes.
    pub fn parameter_count(&self) -> u64 {
        self.content
            .tensor_infos
            .values()
            .map(|t| t.shape.elem_count() as u64)
            .sum()
    }

    /// Bytes of tensor data (what the weights occupy once loaded).
    pub fn weight_bytes(&self) -> u64 {
        self.content
            .tensor_infos
            .values()
            .map(|t| {
                (t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()) as u64
            })
            .sum()
    }

    /// The quantization most of the weight bytes use, e.g. "Q4_K".
    pub fn dominant_quant(&self) -> String {
        let mut by_type: std::collections::HashMap<String, u64> = Default::default();
        for t in self.content.tensor_infos.values() {
            let bytes = (t.shape.elem_count() / t.ggml_dtype.block_size()
                * t.ggml_dtype.type_size()) as u64;
            *by_type.entry(format!("{:?}", t.ggml_dtype)).or_default() += bytes;
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
