//! GGUF: reading (metadata, tensor directory, dequantization to f32) and writing.
//!
//! The format (version 2 and 3): a header (`GGUF`, version, tensor count, metadata count),
//! the metadata key/value pairs, the tensor directory (name, dims innermost-first, ggml
//! type, offset), then the tensor data, aligned to `general.alignment` (default 32).
//! Every read is bounds-checked: a truncated or corrupt file gives an error naming the
//! file and what was being read, never a panic.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::{EngineError, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: usize = 32;
const FORMAT: &str = "GGUF";

/// The tensor element types Lathe reads and writes (ggml's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)] // ggml's own names
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
    /// K-quants: super-blocks of 256 values with 6-bit sub-block scales.
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    fn from_id(id: u32) -> std::result::Result<Self, String> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            other => {
                let name = match other {
                    6 => "Q5_0",
                    7 => "Q5_1",
                    9 => "Q8_1",
                    10 => "Q2_K",
                    11 => "Q3_K",
                    15 => "Q8_K",
                    _ => "an unknown type",
                };
                return Err(format!(
                    "ggml type {other} ({name}); Lathe reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K"
                ));
            }
        })
    }

    fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::BF16 => 30,
        }
    }

    /// (values per block, bytes per block)
    pub(crate) fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
            Self::Q4_K => (256, 144),
            Self::Q5_K => (256, 176),
            Self::Q6_K => (256, 210),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
            Self::BF16 => "BF16",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
        }
    }

    /// Bytes needed for `n` values, or None when `n` is not a whole number of blocks.
    pub(crate) fn byte_len(self, n: usize) -> Option<usize> {
        let (per, bytes) = self.block();
        n.is_multiple_of(per).then(|| n / per * bytes)
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in PyTorch order (outermost first): a `[out, in]` weight is `[out, in]`.
    pub shape: Vec<usize>,
    pub dtype: GgmlType,
    /// Byte range inside the file.
    start: usize,
    len: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened GGUF file: metadata and tensor directory parsed, tensor data read on demand.
pub struct GgufFile {
    path: PathBuf,
    bytes: memmap2::Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn malformed(&self, detail: String) -> EngineError {
        EngineError::Malformed {
            path: self.path.to_path_buf(),
            format: FORMAT,
            detail,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.malformed(format!(
                "file ends at byte {} while reading {what} ({n} bytes at offset {}): truncated?",
                self.bytes.len(),
                self.pos
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit what is left of the file (each item needs at least `min_item` bytes).
    fn count(&mut self, what: &str, min_item: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(self.malformed(format!(
                "{what} is {n}, more than the {left} bytes left in the file can hold"
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let raw = self.take(n, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|e| self.malformed(format!("{what} is not valid UTF-8: {e}")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 if depth == 0 => {
                let item_ty = self.u32(key)?;
                let n = self.count(&format!("length of array `{key}`"), 1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(self.malformed(format!(
                    "metadata `{key}` has value type {other}, which GGUF does not define"
                )));
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
        // SAFETY: the map is read-only and Lathe never writes to model files it has opened;
        // a file truncated underneath us by another process is outside what we defend against.
        #[allow(unsafe_code)]
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        Self::parse(path, bytes)
    }

    fn parse(path: &Path, bytes: memmap2::Mmap) -> Result<Self> {
        let mut c = Cursor {
            bytes: &bytes,
            pos: 0,
            path,
        };
        if c.take(4, "magic")? != MAGIC {
            return Err(c.malformed("does not start with `GGUF`: not a GGUF file".into()));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(EngineError::Unsupported {
                path: path.into(),
                field: "version".into(),
                detail: format!("GGUF version {version}; Lathe reads versions 2 and 3"),
            });
        }
        let n_tensors = c.count("tensor count", 24)?;
        let n_meta = c.count("metadata count", 12)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_meta {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a as usize,
                _ => return Err(c.malformed(format!("general.alignment is {v:?}"))),
            },
        };
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)? as usize;
            if n_dims > 4 {
                return Err(c.malformed(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)? as usize);
            }
            let ty = c.u32(&name)?;
            let offset = c.u64(&name)? as usize;
            raw.push((name, dims, ty, offset));
        }
        let data_start = c.pos.next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut by_name = HashMap::with_capacity(n_tensors);
        for (name, mut dims, ty, offset) in raw {
            let dtype = GgmlType::from_id(ty).map_err(|detail| EngineError::Unsupported {
                path: path.into(),
                field: format!("tensor `{name}` type"),
                detail,
            })?;
            dims.reverse();
            let numel = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let len = numel.and_then(|n| dtype.byte_len(n)).ok_or_else(|| {
                c.malformed(format!(
                    "tensor `{name}` of shape {dims:?} is not a whole number of {} blocks",
                    dtype.name()
                ))
            })?;
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            let Some((start, end)) = start.zip(end) else {
                return Err(c.malformed(format!("tensor `{name}` offset {offset} overflows")));
            };
            if end > bytes.len() {
                return Err(c.malformed(format!(
                    "tensor `{name}` needs bytes {start}..{end} but the file has {}: truncated?",
                    bytes.len()
                )));
            }
            by_name.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo {
                name,
                shape: dims,
                dtype,
                start,
                len,
            });
        }
        Ok(Self {
            path: path.into(),
            bytes,
            version,
            metadata,
            tensors,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The `tokenizer.*` keys, to write a GGUF that tokenizes as this one does.
    pub fn tokenizer_meta(&self) -> Vec<(String, Value)> {
        self.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw (possibly quantized) bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.bytes[info.start..info.start + info.len]
    }

    /// The type most of the matrices' values are stored in: what a file is called
    /// (`Q4_1` for a "Q4_1 GGUF" whose embeddings may be Q8_0). None without matrices.
    pub fn weight_type(&self) -> Option<GgmlType> {
        let mut counts: Vec<(GgmlType, usize)> = Vec::new();
        for t in self.tensors.iter().filter(|t| t.shape.len() == 2) {
            match counts.iter_mut().find(|(ty, _)| *ty == t.dtype) {
                Some((_, n)) => *n += t.numel(),
                None => counts.push((t.dtype, t.numel())),
            }
        }
        counts.into_iter().max_by_key(|&(_, n)| n).map(|(ty, _)| ty)
    }

    /// A tensor dequantized to f32, with its shape (outermost first).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensor_info(name).ok_or_else(|| EngineError::Missing {
            path: self.path.clone(),
            field: format!("tensor `{name}`"),
        })?;
        let data = dequantize(info.dtype, self.tensor_bytes(info), info.numel());
        Ok((info.shape.clone(), data))
    }
}

/// Dequantizes `n` values of type `ty` from `bytes` (whose length the caller has checked).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    dequantize_into(ty, bytes, &mut out);
    out
}

/// Appends the values of `bytes` (whole blocks of `ty`) to `out`: for kernels that expand
/// one block at a time into a buffer they reuse.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut Vec<f32>) {
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
        ),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for b in bytes.chunks_exact(34) {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let with_min = ty == GgmlType::Q4_1;
            let block = if with_min { 20 } else { 18 };
            for b in bytes.chunks_exact(block) {
                let d = f16_at(b, 0);
                let (m, qs) = if with_min {
                    (f16_at(b, 2), &b[4..20])
                } else {
                    (-8.0 * d, &b[2..18])
                };
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            // d, dmin, 12 bytes of packed 6-bit (scale, min) pairs for 8 sub-blocks of 32,
            // [Q5_K: 32 bytes of fifth bits], 128 bytes of nibbles (two sub-blocks share
            // 32 bytes: low nibbles first).
            let five = ty == GgmlType::Q5_K;
            for b in bytes.chunks_exact(if five { 176 } else { 144 }) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let (qh, qs) = if five { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
                let (sc, m) = k_scales_mins(scales);
                for pair in 0..4 {
                    let q = &qs[32 * pair..32 * pair + 32];
                    for half in 0..2 {
                        let j = 2 * pair + half;
                        let (scale, min) = (d * f32::from(sc[j]), dmin * f32::from(m[j]));
                        let bit = 1u8 << j;
                        out.extend(q.iter().enumerate().map(|(l, &byte)| {
                            let mut v = if half == 0 { byte & 0x0f } else { byte >> 4 };
                            if five && qh[l] & bit != 0 {
                                v += 16;
                            }
                            scale * f32::from(v) - min
                        }));
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            // 128 bytes low 4 bits, 64 bytes high 2 bits, 16 signed 8-bit scales (one per
            // 16 values), then d.
            for b in bytes.chunks_exact(210) {
                let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], f16_at(b, 208));
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                    let mut y = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = |low: u8, shift: u32| f32::from((low | (((qh[l] >> shift) & 3) << 4)) as i8 - 32);
                        y[l] = d * f32::from(sc[is] as i8) * q(ql[l] & 0x0f, 0);
                        y[l + 32] = d * f32::from(sc[is + 2] as i8) * q(ql[l + 32] & 0x0f, 2);
                        y[l + 64] = d * f32::from(sc[is + 4] as i8) * q(ql[l] >> 4, 4);
                        y[l + 96] = d * f32::from(sc[is + 6] as i8) * q(ql[l + 32] >> 4, 6);
                    }
                    out.extend_from_slice(&y);
                }
            }
        }
    }
}

/// The 6-bit scales and mins of a K-quant super-block's eight sub-blocks, from its 12
/// packed bytes `q`: sub-blocks 0-3 keep theirs in the low six bits of bytes 0-3 (scales)
/// and 4-7 (mins); sub-blocks 4-7 keep their low four bits in the nibbles of bytes 8-11
/// (scale low, min high) and their top two in the top bits of bytes 0-3 and 4-7. Four
/// bytes at a time, in 32-bit words: the 8-bit kernels decode a super-block's sixteen
/// numbers in a dozen operations where one at a time took a hundred.
#[inline(always)]
pub(crate) fn k_scales_mins(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let word = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (a, b, c) = (word(0), word(1), word(2));
    let (six, four, two) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let scales = u64::from(a & six) | u64::from((c & four) | (((a >> 6) & two) << 4)) << 32;
    let mins = u64::from(b & six) | u64::from(((c >> 4) & four) | (((b >> 6) & two) << 4)) << 32;
    (scales.to_le_bytes(), mins.to_le_bytes())
}

/// Quantizes f32 values (a whole number of blocks) to `ty`, as llama.cpp's reference
/// quantizers do (the K-quants without their search for the best scales). Lathe writes
/// every type it reads but Q5_K.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ty.byte_len(values.len()).unwrap_or(0));
    match ty {
        GgmlType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for block in values.chunks_exact(32) {
                let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|v| (v * inv).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for block in values.chunks_exact(32) {
                // The value of largest magnitude maps to -8, as in ggml's quantize_row_q4_0.
                let max = block
                    .iter()
                    .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * inv + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for block in values.chunks_exact(32) {
                let min = block.iter().copied().fold(f32::INFINITY, f32::min);
                let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * inv + 0.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
            }
        }
        GgmlType::Q4_K => values.chunks_exact(256).for_each(|b| quantize_q4_k(b, &mut out)),
        GgmlType::Q6_K => values.chunks_exact(256).for_each(|b| quantize_q6_k(b, &mut out)),
        GgmlType::Q5_K => panic!("Lathe does not write Q5_K tensors"),
    }
    out
}

/// One Q4_K super-block of 256 values: eight sub-blocks of 32, each `scale · q − min` with
/// q in 0..16; the sub-blocks' scales and mins are 6-bit multiples of two f16 factors.
/// Each sub-block spans its own range, as ggml's reference does before its refinement search.
fn quantize_q4_k(block: &[f32], out: &mut Vec<u8>) {
    let mut scale = [0f32; 8];
    let mut min = [0f32; 8];
    for (j, sub) in block.chunks_exact(32).enumerate() {
        let lo = sub.iter().copied().fold(0f32, f32::min);
        let hi = sub.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scale[j] = (hi - lo) / 15.0;
        min[j] = -lo;
    }
    let six = |v: &[f32; 8]| {
        let d = v.iter().copied().fold(0f32, f32::max) / 63.0;
        let d = f16::from_f32(d).to_f32();
        let q: [u8; 8] = std::array::from_fn(|j| if d > 0.0 { (v[j] / d).round().clamp(0.0, 63.0) as u8 } else { 0 });
        (d, q)
    };
    let (d, sc) = six(&scale);
    let (dmin, m) = six(&min);
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&f16::from_f32(dmin).to_le_bytes());
    // The packing `k_scales_mins` reads back.
    for j in 0..4 {
        out.push(sc[j] | ((sc[j + 4] >> 4) << 6));
    }
    for j in 0..4 {
        out.push(m[j] | ((m[j + 4] >> 4) << 6));
    }
    for j in 0..4 {
        out.push((sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4));
    }
    let codes: Vec<u8> = block
        .chunks_exact(32)
        .enumerate()
        .flat_map(|(j, sub)| {
            let (s, mn) = (d * f32::from(sc[j]), dmin * f32::from(m[j]));
            sub.iter().map(move |&v| if s > 0.0 { ((v + mn) / s).round().clamp(0.0, 15.0) as u8 } else { 0 })
        })
        .collect();
    // Two sub-blocks share 32 bytes: the first in the low nibbles.
    for pair in codes.chunks_exact(64) {
        out.extend((0..32).map(|l| pair[l] | (pair[l + 32] << 4)));
    }
}

/// One Q6_K super-block of 256 values: sixteen sub-blocks of 16, each `d · scale · (q − 32)`
/// with q in 0..64 and a signed 8-bit scale per sub-block.
fn quantize_q6_k(block: &[f32], out: &mut Vec<u8>) {
    let scale: [f32; 16] = std::array::from_fn(|s| block[16 * s..16 * s + 16].iter().fold(0f32, |a, v| a.max(v.abs())) / 31.0);
    let d = f16::from_f32(scale.iter().copied().fold(0f32, f32::max) / 127.0).to_f32();
    let sc: [i8; 16] = std::array::from_fn(|s| if d > 0.0 { (scale[s] / d).round().clamp(-128.0, 127.0) as i8 } else { 0 });
    let q: Vec<u8> = block
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let s = d * f32::from(sc[i / 16]);
            if s != 0.0 { ((v / s).round() + 32.0).clamp(0.0, 63.0) as u8 } else { 32 }
        })
        .collect();
    // Per half of 128: low 4 bits of values l and l+64 share byte l (l < 64), the high 2
    // bits of l, l+32, l+64, l+96 share byte l (l < 32): the layout `dequantize` reads.
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for h in 0..2 {
        let q = &q[128 * h..128 * h + 128];
        for l in 0..32 {
            ql[64 * h + l] = (q[l] & 0x0f) | ((q[l + 64] & 0x0f) << 4);
            ql[64 * h + l + 32] = (q[l + 32] & 0x0f) | ((q[l + 96] & 0x0f) << 4);
            qh[32 * h + l] = (q[l] >> 4) | ((q[l + 32] >> 4) << 2) | ((q[l + 64] >> 4) << 4) | ((q[l + 96] >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
}

/// Builds a GGUF file: metadata in insertion order, then tensors.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(&mut self, key: impl Into<String>, value: Value) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Adds a tensor given in PyTorch order (outermost first), quantizing it to `ty`.
    /// Quantized types need the innermost dimension to be a whole number of blocks (32
    /// values, 256 for K-quants); other tensors are written F32.
    pub fn tensor(&mut self, name: impl Into<String>, shape: &[usize], ty: GgmlType, values: &[f32]) {
        let name = name.into();
        let inner = shape.last().copied().unwrap_or(1);
        assert!(ty != GgmlType::Q5_K, "Lathe writes F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K tensors");
        let ty = if ty.byte_len(inner).is_some() { ty } else { GgmlType::F32 };
        assert_eq!(shape.iter().product::<usize>(), values.len(), "tensor `{name}`");
        self.tensors
            .push((name, shape.to_vec(), ty, quantize(ty, values)));
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        fn put_str(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        fn put_value(out: &mut Vec<u8>, v: &Value) {
            match v {
                Value::U8(x) => out.push(*x),
                Value::I8(x) => out.push(*x as u8),
                Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::Bool(x) => out.push(u8::from(*x)),
                Value::String(s) => put_str(out, s),
                Value::Array(items) => {
                    let item_ty = items.first().map_or(4, Value::type_id);
                    out.extend_from_slice(&item_ty.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    items.iter().for_each(|i| put_value(out, i));
                }
                Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for (name, shape, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + data.len()).next_multiple_of(DEFAULT_ALIGNMENT);
        }
        out.resize(out.len().next_multiple_of(DEFAULT_ALIGNMENT), 0);
        for (_, _, _, data) in &self.tensors {
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(DEFAULT_ALIGNMENT), 0);
        }
        out
    }

    /// Writes the file atomically: a temporary name in the same folder, fsync, rename.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::error::write_atomic(path.as_ref(), &self.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect()
    }

    #[test]
    fn quantize_dequantize_round_trip_within_format_precision() {
        let v = sample(256);
        let amax = v.iter().fold(0f32, |a, x| a.max(x.abs()));
        for (ty, tol) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::BF16, 1e-2),
            (GgmlType::Q8_0, amax / 127.0),
            (GgmlType::Q4_0, amax / 8.0),
            (GgmlType::Q4_1, 2.0 * amax / 15.0),
            // Half a sub-block's step (its range / 15), plus the 6-bit rounding of its
            // scale and min: within one step.
            (GgmlType::Q4_K, 2.0 * amax / 15.0),
            (GgmlType::Q6_K, amax / 31.0),
        ] {
            let back = dequantize(ty, &quantize(ty, &v), v.len());
            let err = v.iter().zip(&back).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(err <= tol, "{ty:?}: max error {err} > {tol}");
        }
    }

    #[test]
    fn k_quants_match_gguf_py() {
        // Blocks and gguf-py's dequantization of them: scripts/make_kquant_fixture.py.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/kquants");
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            let blocks = std::fs::read(dir.join(format!("{}.bin", ty.name()))).unwrap();
            let want: Vec<f32> = std::fs::read(dir.join(format!("{}.f32", ty.name())))
                .unwrap()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let got = dequantize(ty, &blocks, want.len());
            let worst = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs() / (1.0 + w.abs())));
            assert!(worst < 1e-6, "{ty:?}: relative error {worst}");
        }
    }

    #[test]
    fn q4_1_block_layout_matches_ggml() {
        // One hand-built block: d = 0.5, m = -1, low nibbles 0..15, high nibbles 15..0.
        let mut b = Vec::new();
        b.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v = dequantize(GgmlType::Q4_1, &b, 32);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[15], 6.5);
        assert_eq!(v[16], 6.5);
        assert_eq!(v[31], -1.0);
    }
}
